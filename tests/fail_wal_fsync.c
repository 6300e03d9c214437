/* LD_PRELOAD shim for tests/test_storage_faults.py: fail ONE fsync of a frontend's WAL with EIO, or hold them.
 *
 * While the file named by HERALD_TEST_FSYNC_FAIL_TRIGGER exists, the next fdatasync or fsync of a
 * RocksDB WAL file ("*.log") under a shard folder ("/shard-") fails with EIO, and the trigger is
 * removed, so the frontend that restarts afterwards syncs normally. While the file named by
 * HERALD_TEST_FSYNC_HOLD exists, such an fsync waits (then goes on as usual): a batch stays written
 * and not yet durable for as long as a test needs. With HERALD_TEST_FSYNC_DELAY_US set, every such
 * fsync first sleeps that many microseconds: a slow disk for benchmarks (bench/README.md, "Fifteenth
 * round"). Every other call goes to libc.
 */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

static int is_shard_wal(int fd) {
    char link[64], path[4096];
    snprintf(link, sizeof link, "/proc/self/fd/%d", fd);
    ssize_t n = readlink(link, path, sizeof path - 1);
    if (n < 5) return 0;
    path[n] = '\0';
    return strstr(path, "/shard-") != NULL && strcmp(path + n - 4, ".log") == 0;
}

static int should_fail(int fd) {
    const char *delay = getenv("HERALD_TEST_FSYNC_DELAY_US");
    if (delay != NULL && is_shard_wal(fd)) usleep((useconds_t)atoi(delay));
    const char *hold = getenv("HERALD_TEST_FSYNC_HOLD");
    if (hold != NULL && access(hold, F_OK) == 0 && is_shard_wal(fd)) {
        while (access(hold, F_OK) == 0) usleep(1000);
    }
    const char *trigger = getenv("HERALD_TEST_FSYNC_FAIL_TRIGGER");
    if (trigger == NULL || access(trigger, F_OK) != 0 || !is_shard_wal(fd)) return 0;
    return unlink(trigger) == 0; /* only the caller that removed it fails */
}

int fdatasync(int fd) {
    static int (*real)(int) = NULL;
    if (real == NULL) real = (int (*)(int))dlsym(RTLD_NEXT, "fdatasync");
    if (should_fail(fd)) {
        errno = EIO;
        return -1;
    }
    return real(fd);
}

int fsync(int fd) {
    static int (*real)(int) = NULL;
    if (real == NULL) real = (int (*)(int))dlsym(RTLD_NEXT, "fsync");
    if (should_fail(fd)) {
        errno = EIO;
        return -1;
    }
    return real(fd);
}
