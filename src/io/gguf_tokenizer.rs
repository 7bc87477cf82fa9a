//! Tokenizer from GGUF metadata.
