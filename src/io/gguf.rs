//! GGUF reader (llama.cpp's model format).
