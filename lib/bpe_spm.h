// defines: SpmTokenizer, spm_json_is_sentencepiece, spm_load_json, spm_is_protobuf, spm_load_model, spm_free, spm_encode, spm_decode, spm_token_bytes, spm_is_special, spm_token_id, spm_vocab_size, spm_bos_id, spm_eos_id, spm_adds_bos, spm_fingerprint
// The SentencePiece-style BPE half of lib/tokenizer.h ("bpe-sentencepiece"), for Llama 2,
// Mistral, TinyLlama and stories260K. Two sources, one engine:
//   - a parsed Hugging Face tokenizer.json: model BPE with byte_fallback, normalizer
//     Sequence[Prepend("▁"), Replace(" ", "▁")] or pre_tokenizer Metaspace, merges in both the
//     "a b" and the [a, b] form, <0xNN> byte tokens, unk, added_tokens;
//   - Llama 2's protobuf tokenizer.model (ModelProto.pieces {piece, score, type}), merged by
//     piece score exactly as sentencepiece's bpe_model.cc does (highest score first, leftmost
//     on ties).
// Merging is heap-based: O(n log n) in the length of a word, whatever the input (a 1 MB run of
// one character included).
// lib/tokenizer.c dispatches the Tokenizer calls of the "bpe-sentencepiece" kind here; the
// functions mirror tokenizer.h one for one and have the same contracts.
#ifndef BPE_SPM_H
#define BPE_SPM_H

#include <jansson.h>
#include <stddef.h>
#include <stdint.h>

#include "err.h"

typedef struct SpmTokenizer SpmTokenizer;

// 1 when a parsed tokenizer.json is of the SentencePiece kind (model.type "BPE" and either
// model.byte_fallback true, or a Metaspace pre-tokenizer/decoder, or a Prepend("▁") normalizer),
// 0 otherwise (e.g. byte-level BPE, which lib/bpe_bytelevel.c takes).
int spm_json_is_sentencepiece(const json_t *root);

// Build from a parsed tokenizer.json (root object; not kept, not freed). name is the file name
// used in messages. NULL with a message naming the unsupported part ("normalizer Lowercase is
// not supported", "model.type WordPiece ...").
// BOS/EOS come from the post_processor (TemplateProcessing) when present, else "<s>"/"</s>";
// tokenizer.c may override them from tokenizer_config.json / generation_config.json.
SpmTokenizer *spm_load_json(const json_t *root, const char *name, Err *err);

// 1 when the first bytes of a tokenizer.model look like a SentencePiece ModelProto (protobuf,
// field 1 length-delimited) rather than tiktoken's base64 rank lines.
int spm_is_protobuf(const unsigned char *head, size_t len);

// Build from a protobuf tokenizer.model path. BOS/EOS/UNK from its trainer_spec (defaults
// 1/2/0); add_dummy_prefix from its normalizer_spec. NULL with a message on a bad file or a
// model type other than BPE.
SpmTokenizer *spm_load_model(const char *path, Err *err);

void spm_free(SpmTokenizer *t);

// Same contract as tokenizer_encode. When offsets is not NULL, *offsets is kept at the same
// capacity (*cap) as *ids (both are realloc'ed together), offsets[i] = byte offset in text
// where token i starts (the prepended "▁" maps to offset 0, a byte-fallback token to its byte).
// parse_special: special-token names (added_tokens / CONTROL pieces) in the text become their
// ids; otherwise they are plain text.
long spm_encode(const SpmTokenizer *t, const char *text, size_t len, int parse_special,
                uint32_t **ids, size_t *cap, size_t n, uint32_t **offsets, Err *err);

// Same contract as tokenizer_decode (decoder: "▁" -> " ", byte fallback, fuse, strip one
// leading space when the model prepends one).
long spm_decode(const SpmTokenizer *t, const uint32_t *ids, size_t n, int skip_special,
                char **out, size_t *cap, size_t len, Err *err);

// Bytes of one token: "▁" shown as a space, <0xNN> as the byte, specials as their names.
const char *spm_token_bytes(const SpmTokenizer *t, uint32_t id, size_t *len);
int spm_is_special(const SpmTokenizer *t, uint32_t id);
int64_t spm_token_id(const SpmTokenizer *t, const char *s, size_t len);   // exact piece/name
uint32_t spm_vocab_size(const SpmTokenizer *t);
int64_t spm_bos_id(const SpmTokenizer *t);
int64_t spm_eos_id(const SpmTokenizer *t);
int spm_adds_bos(const SpmTokenizer *t);
// XXH3-64 of the normalised definition: kind, prefix-space policy, pieces by id, the merge
// order as (left id, right id) pairs, special ids; computed once at load. A protobuf model's
// merge list is ordered as transformers 4.x's SentencePieceExtractor writes it (score, then
// merged id, left id, right id), meant to match a tokenizer.json converted by it (not verified:
// no such file for Llama 2 is at hand); converters that order merges otherwise (transformers 5
// sorts ties by piece length) give another value, and the tools then refuse to mix the two
// (a safe failure).
uint64_t spm_fingerprint(const SpmTokenizer *t);

#endif
