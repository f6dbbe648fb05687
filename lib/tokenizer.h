// defines: Tokenizer and its functions (load, encode, decode, fingerprint)
// One interface over the tokenizers of Llama-family models:
//   - byte-level BPE: Llama 3 tiktoken `tokenizer.model` (base64 rank lines) and Hugging Face
//     tokenizer.json of type BPE with a ByteLevel pre-tokenizer (lib/bpe_bytelevel.c);
//   - SentencePiece-style BPE as Hugging Face writes it for Llama 2 / Mistral / TinyLlama
//     (Metaspace or Prepend+Replace normalizer, byte fallback), and Llama 2's protobuf
//     `tokenizer.model` (lib/bpe_spm.c).
// The exactness contract: tokenizer_encode equals the reference implementation (Hugging Face
// tokenizers / tiktoken) on every input.
#ifndef TOKENIZER_H
#define TOKENIZER_H

#include <stddef.h>
#include <stdint.h>

#include "err.h"

typedef struct Tokenizer Tokenizer;

// Load from a model directory (tokenizer.json preferred, else tokenizer.model; special tokens
// and BOS/EOS policy from tokenizer_config.json, generation_config.json, the post-processor)
// or from a single tokenizer file. NULL with a message naming the file and the unsupported part.
// Loading a byte-level BPE uses up to omp_get_max_threads() threads (OMP_NUM_THREADS, or
// omp_set_num_threads before the call; at most 32), all ended when it returns; the tokenizer
// does not depend on their number.
Tokenizer *tokenizer_load(const char *path, Err *err);
void tokenizer_free(Tokenizer *t);

// Encode len bytes of UTF-8 text (need not be NUL-terminated). Appends ids to *ids (growing
// *cap with realloc) and returns the new count, or -1 (invalid UTF-8, out of memory).
// parse_special: special-token names in the text become their ids (else they are plain text).
// No BOS/EOS is added here: that is policy, applied by the caller (tok).
// offsets (optional, may be NULL): for each id appended, the byte offset in text where the
// token starts, so callers can map segment boundaries onto token boundaries.
// Thread safety: a Tokenizer may be used from several threads at once.
long tokenizer_encode(const Tokenizer *t, const char *text, size_t len, int parse_special,
                      uint32_t **ids, size_t *cap, size_t n, uint32_t **offsets, Err *err);

// The bytes of one token (byte-level/byte-fallback decoded; the SentencePiece "▁" shown as a
// space). Special tokens give their name. Returns NULL for an id out of range.
const char *tokenizer_token_bytes(const Tokenizer *t, uint32_t id, size_t *len);
int tokenizer_is_special(const Tokenizer *t, uint32_t id);

// Decode ids to text as the reference decoder does (SentencePiece: leading space of the first
// token stripped when the model adds a prefix space). Appends to *out (growing *cap); returns
// the new length or -1. skip_special: leave special tokens out.
long tokenizer_decode(const Tokenizer *t, const uint32_t *ids, size_t n, int skip_special,
                      char **out, size_t *cap, size_t len, Err *err);

uint32_t tokenizer_vocab_size(const Tokenizer *t);   // including added/special tokens
int64_t tokenizer_bos_id(const Tokenizer *t);        // -1 when none
int64_t tokenizer_eos_id(const Tokenizer *t);        // the EOS appended after trained responses
int tokenizer_adds_bos(const Tokenizer *t);          // the model's own policy (post-processor/config)
// Look up a token by its exact string (e.g. "<|eot_id|>"); -1 when absent.
int64_t tokenizer_token_id(const Tokenizer *t, const char *s, size_t len);
// xxHash (XXH3-64) of the normalised tokenizer definition: vocabulary (bytes by id), merges or
// ranks, special tokens, pre-tokenizer and normaliser kind. Equal tokenizers from different
// files (tokenizer.model vs tokenizer.json of the same model) should give the same value.
uint64_t tokenizer_fingerprint(const Tokenizer *t);
const char *tokenizer_kind(const Tokenizer *t);      // e.g. "bpe-bytelevel", "bpe-sentencepiece"

#endif
