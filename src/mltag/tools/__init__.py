"""The commands around the pipeline: predict, suggest, doctor."""
