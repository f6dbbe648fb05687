// defines: AlpacaFields, AlpacaTemplate, AlpacaRow, AlpacaParser, AlpacaBuf and their functions
// Alpaca-style instruction data: rows with an instruction, an optional input and an output,
// read from JSON Lines or a JSON array (detected), and the prompt templates that turn a row
// into a prompt (not trained) and a response (trained).
//
// The parser is our own strict RFC 8259 reader, streaming and allocation-free per row: a row's
// strings are decoded into an arena that the next row reuses. Memory is bounded by the longest
// row (JSONL line or array element), never by the input.
#ifndef ALPACA_H
#define ALPACA_H

#include <stddef.h>
#include <stdint.h>
#include <sys/types.h>

#include "err.h"

// The roles a row's fields play. Templates name them {instruction} and {input}.
enum { ALPACA_INSTRUCTION, ALPACA_INPUT, ALPACA_OUTPUT, ALPACA_NROLES };

// Which JSON key holds each role ("instruction", "input", "output" unless remapped), and
// which roles a row must have (instruction and output by default; prompts for generation
// need no output).
typedef struct {
    char name[ALPACA_NROLES][256];
    int required[ALPACA_NROLES];
} AlpacaFields;

void alpaca_fields_default(AlpacaFields *f);
// spec "instruction=question": role instruction is read from key "question". -1 when the
// role is unknown, the key empty or too long, or two roles would share a key.
int alpaca_fields_set(AlpacaFields *f, const char *spec, Err *err);
const char *alpaca_role_name(int role);   // "instruction", "input", "output"

// ---------------------------------------------------------------- templates

typedef struct AlpacaTemplate AlpacaTemplate;

// Built-in templates by name ("alpaca", "unsloth"); NULL with a message for other names.
AlpacaTemplate *alpaca_template_builtin(const char *name, Err *err);
// A template file in the alpaca-lora JSON form: {"description": ..., "prompt_input": ...,
// "prompt_no_input": ..., "response_split": ...}; only prompt_input is required. Placeholders
// follow Python's str.format as alpaca-lora uses it: {instruction}, {input}, and {{ }} for
// literal braces.
AlpacaTemplate *alpaca_template_load(const char *path, Err *err);
const char *alpaca_template_builtin_list(void);   // "alpaca, unsloth"
// The template in the alpaca-lora JSON form (malloc'd, caller frees); NULL when out of memory.
char *alpaca_template_json(const AlpacaTemplate *t);
void alpaca_template_free(AlpacaTemplate *t);

// A growing byte buffer; keep one per loop so that formatting allocates only while it grows.
typedef struct {
    char *data;
    size_t len, cap;
} AlpacaBuf;
void alpaca_buf_free(AlpacaBuf *b);

// ---------------------------------------------------------------- rows

typedef struct {
    const char *ptr;   // (len) UTF-8 bytes, not NUL-terminated; valid until the next row
    size_t len;
} AlpacaStr;

// Why a row was rejected; a skippable problem confined to one row.
typedef enum {
    ALPACA_BAD_JSON = 1,       // malformed JSON (only JSON Lines rows can be skipped)
    ALPACA_BAD_NOT_OBJECT,     // the row is a JSON value but not an object
    ALPACA_BAD_MISSING,        // a required field (instruction, output) is absent
    ALPACA_BAD_NOT_STRING,     // a role's field holds a number, object, array, bool or null
    ALPACA_BAD_DUPLICATE,      // a role's field appears twice
    ALPACA_BAD_UTF8,           // invalid UTF-8, or a \u escape that is a lone surrogate
} AlpacaBad;
const char *alpaca_bad_name(AlpacaBad why);   // "malformed JSON", "missing field", ...

#define ALPACA_MAX_UNKNOWN 16

typedef struct {
    AlpacaStr field[ALPACA_NROLES];
    int has[ALPACA_NROLES];     // input may be absent (or null); the others are required
    uint64_t index;             // JSONL: the line number; array: the element number (1-based)
    uint64_t line;              // the line the row starts on, or for a bad row where it went bad
    size_t nunknown;            // keys that are no role, in order (at most ALPACA_MAX_UNKNOWN)
    AlpacaStr unknown[ALPACA_MAX_UNKNOWN];
    AlpacaBad bad;              // set when alpaca_parser_next returns ALPACA_ROW_BAD
    int bad_role;               // the role concerned, or -1
} AlpacaRow;

typedef struct AlpacaParser AlpacaParser;

// Where the parser pulls bytes from: the count read, 0 at the end, -1 with a message.
typedef ssize_t (*AlpacaReadFn)(void *ctx, void *buf, size_t cap, Err *err);

enum { ALPACA_ROW_END = 0, ALPACA_ROW_OK = 1, ALPACA_ROW_BAD = 2, ALPACA_ROW_FATAL = -1 };
enum { ALPACA_FORMAT_UNKNOWN, ALPACA_FORMAT_JSONL, ALPACA_FORMAT_ARRAY };

AlpacaParser *alpaca_parser_new(const AlpacaFields *fields, Err *err);
// Starts a new stream (the parser's buffers are kept).
void alpaca_parser_start(AlpacaParser *p, AlpacaReadFn read, void *ctx);
// Next row: ALPACA_ROW_OK, ALPACA_ROW_END, ALPACA_ROW_BAD (the row is skipped, the message in
// err, the reason in row->bad; parsing can go on) or ALPACA_ROW_FATAL (message in err; the
// stream cannot go on; row->line is the line, or 0 for a read error whose message names the
// input). Messages carry no file name or line: callers put "name:line: " in front.
int alpaca_parser_next(AlpacaParser *p, AlpacaRow *row, Err *err);
int alpaca_parser_format(const AlpacaParser *p);   // known after the first row
void alpaca_parser_free(AlpacaParser *p);

// The prompt for a row: the template's prompt_input when the row has a non-empty input (or
// when the template has no prompt_no_input), else prompt_no_input; replaces out's contents.
// -1 only when out of memory.
int alpaca_format_prompt(const AlpacaTemplate *t, const AlpacaRow *row, AlpacaBuf *out, Err *err);

#endif
