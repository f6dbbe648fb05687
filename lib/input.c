#include "input.h"

#include <archive.h>
#include <archive_entry.h>
#include <errno.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

// libarchive's read-ahead block: large blocks keep the per-call overhead out of the profile.
#define INPUT_BLOCK (1u << 20)

#ifdef EFTYPE
#define INPUT_ERRNO_FILE_FORMAT EFTYPE
#else
#define INPUT_ERRNO_FILE_FORMAT EILSEQ
#endif

struct Input {
    struct archive *a;
    char *path;       // as given, "<stdin>" for stdin; names in messages start with it
    char *member;     // the one member asked for with "archive:member", or NULL
    char *name;       // current stream's display name (owned)
    const char *entry_name;  // current member's name inside the archive (libarchive's)
    int is_archive;
    int member_found;
    int raw_done;     // a plain or compressed file is one stream: handed out already
};

// Only the filters and formats we mean: libarchive's "all" includes bidders (uu, mtree, lha,
// cab with self-extractor scanning) that can claim an ordinary text file.
static int support_formats(struct archive *a)
{
    int (*filters[])(struct archive *) = {
        archive_read_support_filter_gzip, archive_read_support_filter_bzip2,
        archive_read_support_filter_xz,   archive_read_support_filter_lzma,
        archive_read_support_filter_zstd, archive_read_support_filter_lz4,
    };
    for (size_t i = 0; i < sizeof filters / sizeof filters[0]; i++)
        if (filters[i](a) < ARCHIVE_WARN)   // WARN: done by an external program, still works
            return -1;
    if (archive_read_support_format_tar(a) != ARCHIVE_OK ||
        archive_read_support_format_zip(a) != ARCHIVE_OK ||
        archive_read_support_format_raw(a) != ARCHIVE_OK)
        return -1;
    return 0;
}

static int is_existing_path(const char *path)
{
    struct stat st;
    return stat(path, &st) == 0;
}

Input *input_open(const char *path, Err *err)
{
    Input *in = calloc(1, sizeof *in);
    if (!in) {
        err_set(err, "out of memory");
        return NULL;
    }
    int use_stdin = !path || strcmp(path, "-") == 0;
    in->path = strdup(use_stdin ? "<stdin>" : path);
    if (!in->path)
        goto oom;
    // "archive.tar:dir/member.json": split at the last ':' whose left side exists, but only
    // when the whole string is not itself a file (names may contain ':').
    const char *open_path = in->path;
    if (!use_stdin && !is_existing_path(path)) {
        for (char *colon = strrchr(in->path, ':'); colon; ) {
            *colon = '\0';
            if (colon[1] && is_existing_path(in->path)) {
                in->member = strdup(colon + 1);
                if (!in->member)
                    goto oom;
                break;
            }
            char *prev = strrchr(in->path, ':');
            *colon = ':';
            colon = prev;
        }
    }
    if (!use_stdin) {
        struct stat st;
        if (stat(open_path, &st) != 0) {
            err_set(err, "%s: %s", open_path, strerror(errno));
            goto fail;
        }
        if (S_ISDIR(st.st_mode)) {
            err_set(err, "%s: is a directory", open_path);
            goto fail;
        }
    }
    in->a = archive_read_new();
    if (!in->a)
        goto oom;
    if (support_formats(in->a) < 0) {
        err_set(err, "%s: libarchive: %s", open_path, archive_error_string(in->a));
        goto fail;
    }
    int r = use_stdin ? archive_read_open_fd(in->a, STDIN_FILENO, INPUT_BLOCK)
                      : archive_read_open_filename(in->a, open_path, INPUT_BLOCK);
    if (r != ARCHIVE_OK) {
        // With the raw format enabled every non-empty input is recognised, so "unrecognised"
        // means nothing at all was there (after decompression): one empty stream.
        // (libarchive reports that as ARCHIVE_ERRNO_FILE_FORMAT, which is EILSEQ on Linux
        // and the BSDs without EFTYPE; see its archive_platform.h.)
        if (archive_errno(in->a) == INPUT_ERRNO_FILE_FORMAT && !in->member) {
            archive_read_free(in->a);
            in->a = NULL;
            return in;
        }
        const char *why = archive_error_string(in->a);
        err_set(err, "%s: %s", open_path, why ? why : strerror(archive_errno(in->a)));
        goto fail;
    }
    return in;
oom:
    err_set(err, "out of memory");
fail:
    input_close(in);
    return NULL;
}

static int set_name(Input *in, const char *member, Err *err)
{
    free(in->name);
    size_t n = strlen(in->path) + (member ? strlen(member) + 1 : 0) + 1;
    in->name = malloc(n);
    if (!in->name)
        return err_set(err, "out of memory");
    if (member)
        snprintf(in->name, n, "%s:%s", in->path, member);
    else
        snprintf(in->name, n, "%s", in->path);
    return 0;
}

int input_next(Input *in, Err *err)
{
    if (in->raw_done || (in->member && in->member_found))
        return 0;   // the one member asked for is done: do not decompress the rest
    if (!in->a) {   // empty input
        in->raw_done = 1;
        return set_name(in, NULL, err) < 0 ? -1 : 1;
    }
    for (;;) {
        struct archive_entry *entry;
        int r = archive_read_next_header(in->a, &entry);
        if (r == ARCHIVE_EOF) {
            // An empty file has no format to detect: it is one empty stream.
            if (!in->name && !in->member) {
                in->raw_done = 1;
                return set_name(in, NULL, err) < 0 ? -1 : 1;
            }
            if (in->member && !in->member_found)
                return err_set(err, "%s: no member named \"%s\"", in->path, in->member);
            return 0;
        }
        if (r < ARCHIVE_WARN) {
            const char *why = archive_error_string(in->a);
            return err_set(err, "%s: %s", in->path, why ? why : "cannot read");
        }
        if (archive_format(in->a) == ARCHIVE_FORMAT_RAW) {
            if (in->member)
                return err_set(err, "%s: not a tar or zip archive (asked for member \"%s\")",
                               in->path, in->member);
            in->raw_done = 1;
            in->entry_name = NULL;
            return set_name(in, NULL, err) < 0 ? -1 : 1;
        }
        in->is_archive = 1;
        if (archive_entry_filetype(entry) != AE_IFREG)
            continue;
        const char *member = archive_entry_pathname(entry);
        if (!member)
            continue;
        if (in->member) {
            if (strcmp(member, in->member) != 0)
                continue;
            in->member_found = 1;
        }
        in->entry_name = member;
        return set_name(in, member, err) < 0 ? -1 : 1;
    }
}

const char *input_name(const Input *in)
{
    return in->name ? in->name : in->path;
}

const char *input_member(const Input *in)
{
    return in->is_archive ? in->entry_name : NULL;
}

ssize_t input_read(Input *in, void *buf, size_t cap, Err *err)
{
    if (!in->a)
        return 0;
    for (;;) {
        la_ssize_t n = archive_read_data(in->a, buf, cap);
        if (n >= 0)
            return n;
        if (n == ARCHIVE_RETRY)
            continue;
        const char *why = archive_error_string(in->a);
        return err_set(err, "%s: %s", input_name(in), why ? why : "read error");
    }
}

int input_is_archive(const Input *in)
{
    return in->is_archive;
}

const char *input_wanted_member(const Input *in)
{
    return in->member;
}

void input_close(Input *in)
{
    if (!in)
        return;
    if (in->a)
        archive_read_free(in->a);
    free(in->path);
    free(in->member);
    free(in->name);
    free(in);
}
