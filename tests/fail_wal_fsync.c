/* LD_PRELOAD shim for tests/test_storage_faults.py: fail ONE fsync of a frontend's WAL with EIO.
 *
 * While the file named by HERALD_TEST_FSYNC_FAIL_TRIGGER exists, the next fdatasync or fsync of a
 * RocksDB WAL file ("*.log") under a shard folder ("/shard-") fails with EIO, and the trigger is
 * removed, so the frontend that restarts afterwards syncs normally. Every other call goes to libc.
 */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

static int should_fail(int fd) {
    const char *trigger = getenv("HERALD_TEST_FSYNC_FAIL_TRIGGER");
    if (trigger == NULL || access(trigger, F_OK) != 0) return 0;
    char link[64], path[4096];
    snprintf(link, sizeof link, "/proc/self/fd/%d", fd);
    ssize_t n = readlink(link, path, sizeof path - 1);
    if (n < 5) return 0;
    path[n] = '\0';
    if (strstr(path, "/shard-") == NULL || strcmp(path + n - 4, ".log") != 0) return 0;
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
