"""Data: dataset formats, the hand-off files between steps, the vector store, fetching, decoding images, the demo data."""
