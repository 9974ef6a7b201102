"""hpcllm: GPT-style language model training across MPI ranks."""
