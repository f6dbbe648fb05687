// defines: ByteLevelBpe, bytelevel_json_is_bytelevel, bytelevel_load_json, bytelevel_load_json_text, bytelevel_load_tiktoken, bytelevel_add_token, bytelevel_add_llama3_specials, bytelevel_free, bytelevel_encode, bytelevel_decode, bytelevel_token_bytes, bytelevel_is_special, bytelevel_token_id, bytelevel_vocab_size, bytelevel_adds_bos_template, bytelevel_bos_template, bytelevel_fingerprint, bytelevel_bpe_piece
// The byte-level BPE half of lib/tokenizer.h ("bpe-bytelevel"), for Llama 3 / 3.1 / 3.2. Two
// sources, one engine:
//   - tiktoken's tokenizer.model: one "base64(token bytes) rank" line per token; a pair of
//     adjacent parts merges when their concatenation is a token, lowest rank first (ties: the
//     leftmost), exactly as tiktoken's byte_pair_merge does;
//   - a Hugging Face tokenizer.json: model BPE over ByteLevel-mapped strings, the Llama 3 Split
//     regex, merges as "a b" strings or [a, b] pairs (lowest merge index first, leftmost on ties),
//     ignore_merges, added_tokens.
// Encoding: pieces from lib/pretok.c; a piece that is itself a token is looked up directly
// (tiktoken always does this; Hugging Face when ignore_merges); else a per-thread cache of
// piece -> ids; else BPE: a scan for pieces of up to 16 parts, a heap over a linked list above
// (O(n log n) in the piece length, so 1 MB of one character is fine). Merging starts from whole
// characters where that provably gives the same result (see find_whole_chars); pairs of
// "pure" tokens (whole non-ASCII characters only: CJK words) are answered by a small exact
// table built at load (see build_pure_pairs); every other pair by one probe of a pair table
// (tokenizer.json: its merges; tiktoken: each token's own last merge, built at load, see
// build_rank_pairs). A new piece is first cut where no token can span two adjacent characters
// (see encode_segments); its segments are merged and cached apart.
// Thread safety: all per-thread state lives in ThreadState, found through a pthread key and
// freed with the tokenizer; a loaded tokenizer is otherwise read-only.
#ifndef BPE_BYTELEVEL_H
#define BPE_BYTELEVEL_H

#include <jansson.h>
#include <stddef.h>
#include <stdint.h>

#include "err.h"

typedef struct ByteLevelBpe ByteLevelBpe;

// 1 when a parsed tokenizer.json is a byte-level BPE (model.type "BPE" with a ByteLevel
// pre-tokenizer, alone or inside a Sequence), 0 otherwise.
int bytelevel_json_is_bytelevel(const json_t *root);

// Build from a parsed tokenizer.json (root; not kept). name is used in messages. NULL with a
// message naming the unsupported part ("pre_tokenizer type Whitespace is not supported").
ByteLevelBpe *bytelevel_load_json(const json_t *root, const char *name, Err *err);

// The same from the text of a tokenizer.json, faster: jansson parses all but model.vocab and
// model.merges, which are read straight from the text. NULL with *fallback = 1 when the text is
// not a byte-level BPE or holds anything unexpected (parse it with jansson and call
// bytelevel_load_json, which also gives the messages for malformed files); NULL with
// *fallback = 0 and a message for an unsupported tokenizer.
ByteLevelBpe *bytelevel_load_json_text(const char *text, size_t len, const char *name, int *fallback, Err *err);

// Build from a tiktoken rank file. It holds no special tokens: add them with
// bytelevel_add_token or bytelevel_add_llama3_specials.
ByteLevelBpe *bytelevel_load_tiktoken(const char *path, Err *err);

// Add (or rename) an added token: id may lie past the vocabulary (grows it) or replace an
// added token with the same id. special: hidden by decode's skip_special, matched in text only
// with parse_special; a non-special added token is always matched (as Hugging Face does).
int bytelevel_add_token(ByteLevelBpe *b, uint32_t id, const char *s, size_t len, int special, Err *err);

// The Llama 3.1 / 3.2 table of the 256 special tokens at ids 128000-128255 (names of 3.1:
// <|finetune_right_pad_id|> 128004, <|eom_id|> 128008, <|python_tag|> 128010,
// <|reserved_special_token_N|> for the rest), used when no tokenizer_config.json names them.
int bytelevel_add_llama3_specials(ByteLevelBpe *b, Err *err);

void bytelevel_free(ByteLevelBpe *b);

// Same contract as tokenizer_encode; offsets, when not NULL, is realloc'ed with ids (same *cap).
long bytelevel_encode(const ByteLevelBpe *b, const char *text, size_t len, int parse_special,
                      uint32_t **ids, size_t *cap, size_t n, uint32_t **offsets, Err *err);
// Same contract as tokenizer_decode: the exact bytes of the tokens (no UTF-8 repair).
long bytelevel_decode(const ByteLevelBpe *b, const uint32_t *ids, size_t n, int skip_special,
                      char **out, size_t *cap, size_t len, Err *err);

const char *bytelevel_token_bytes(const ByteLevelBpe *b, uint32_t id, size_t *len);
int bytelevel_is_special(const ByteLevelBpe *b, uint32_t id);
int64_t bytelevel_token_id(const ByteLevelBpe *b, const char *s, size_t len);
uint32_t bytelevel_vocab_size(const ByteLevelBpe *b);
// From a tokenizer.json post_processor: 1 when its TemplateProcessing puts a special token
// before the text (the BOS it adds, in *bos_id); 0 otherwise (ByteLevel post-processor).
int bytelevel_adds_bos_template(const ByteLevelBpe *b, int64_t *bos_id);
// XXH3-64 of: kind, pre-tokenizer pattern, token bytes by id with their special flags, whether
// whole-piece lookup precedes merging, and the merges unless they are implied by the ranks
// (every merge's result id not lower than the previous one's, as in files converted from
// tiktoken). So tokenizer.model + tokenizer_config.json and the matching tokenizer.json agree.
uint64_t bytelevel_fingerprint(const ByteLevelBpe *b);

// BPE of one piece (no whole-piece lookup, no cache): for tests comparing the heap merge with
// the quadratic one, and both with the plain merge. use_heap: 0 quadratic (pieces of at most
// 16 parts), 1 heap, 2 plain: heap from single bytes with the general pair lookup only (no
// whole-character parts, no pure-pair table). Returns the number of ids written to out (room
// for len ids), or -1.
long bytelevel_bpe_piece(const ByteLevelBpe *b, const char *piece, size_t len, int use_heap, uint32_t *out);

#endif
