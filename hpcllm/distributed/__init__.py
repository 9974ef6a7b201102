"""Ranks and what passes between them: the grid, tensor communication, and the data,
pipeline and tensor parallel wrappers; `build.build_rank` assembles one rank."""
