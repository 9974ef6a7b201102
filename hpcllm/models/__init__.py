"""The models: their shape config (torch-free) and the GPT (gpt2 and llama); no MPI."""
