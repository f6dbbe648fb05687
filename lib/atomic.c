#include "atomic.h"

#include <errno.h>
#include <fcntl.h>
#include <libgen.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>  // fchmod
#include <unistd.h>

int atomic_open(AtomicFile *a, const char *path, Err *err)
{
    memset(a, 0, sizeof *a);
    size_t n = strlen(path);
    a->path = strdup(path);
    a->tmp = malloc(n + 16);
    if (!a->path || !a->tmp) {
        atomic_abort(a);
        return err_set(err, "%s: out of memory", path);
    }
    snprintf(a->tmp, n + 16, "%s.tmp.XXXXXX", path);
    int fd = mkstemp(a->tmp);
    if (fd < 0) {
        int e = errno;
        free(a->tmp);
        a->tmp = NULL;
        atomic_abort(a);
        return err_set(err, "%s: cannot create: %s", path, strerror(e));
    }
    fchmod(fd, 0644);
    a->f = fdopen(fd, "wb");
    if (!a->f) {
        close(fd);
        atomic_abort(a);
        return err_set(err, "%s: %s", path, strerror(errno));
    }
    return 0;
}

static void sync_dir(const char *path)
{
    char *copy = strdup(path);
    if (!copy)
        return;
    int fd = open(dirname(copy), O_RDONLY | O_DIRECTORY);
    if (fd >= 0) {
        fsync(fd);
        close(fd);
    }
    free(copy);
}

int atomic_commit(AtomicFile *a, Err *err)
{
    int bad = fflush(a->f) != 0 || ferror(a->f);
    int e = errno;
    if (!bad && fsync(fileno(a->f)) != 0) {
        bad = 1;
        e = errno;
    }
    if (fclose(a->f) != 0 && !bad) {
        bad = 1;
        e = errno;
    }
    a->f = NULL;
    if (bad) {
        err_set(err, "%s: write failed: %s", a->path, strerror(e));
        atomic_abort(a);
        return -1;
    }
    if (rename(a->tmp, a->path) != 0) {
        err_set(err, "%s: cannot rename into place: %s", a->path, strerror(errno));
        atomic_abort(a);
        return -1;
    }
    sync_dir(a->path);
    free(a->tmp);
    free(a->path);
    a->tmp = a->path = NULL;
    return 0;
}

void atomic_abort(AtomicFile *a)
{
    if (a->f)
        fclose(a->f);
    if (a->tmp)
        unlink(a->tmp);
    free(a->tmp);
    free(a->path);
    memset(a, 0, sizeof *a);
}
