"""The head: the sigmoid network on cached vectors, its fits, and the out-of-fold fold heads."""
