/* memfill: fills MiB of anonymous memory with a known pattern and checks it on request, for the post-copy tests.
 *
 * memfill MIB DIR: fills MIB MiB (word i = i * K ^ SEED), writes "filled <checksum>" to DIR/state, then every 20 ms
 * writes a heartbeat count to DIR/beat (fixed width, in place) and, when DIR/verify exists, removes it, reads every
 * word back and writes "verified <mismatches> <checksum>" to DIR/result (renamed into place). The memory is only
 * ever read after the fill: a page that comes back wrong (zeros, another page's contents) is a mismatch. */
#include <fcntl.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <time.h>
#include <unistd.h>

#define K 0x9E3779B97F4A7C15ULL
#define SEED 0x5DEECE66DULL

static uint64_t expected(size_t i) { return (uint64_t)i * K ^ SEED; }

static uint64_t mix(uint64_t h, uint64_t w) { return (h ^ w) * 0x100000001B3ULL; }

static void write_file(const char *dir, const char *name, const char *text) {
    char path[512], tmp[512];
    snprintf(path, sizeof path, "%s/%s", dir, name);
    snprintf(tmp, sizeof tmp, "%s/.%s.tmp", dir, name);
    int fd = open(tmp, O_WRONLY | O_CREAT | O_TRUNC, 0644);
    if (fd < 0 || write(fd, text, strlen(text)) != (ssize_t)strlen(text) || close(fd) != 0 || rename(tmp, path) != 0)
        _exit(3);
}

int main(int argc, char **argv) {
    if (argc != 3)
        return 2;
    size_t words = (size_t)atol(argv[1]) << 20 >> 3;
    const char *dir = argv[2];
    uint64_t *memory = mmap(NULL, words * 8, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (memory == MAP_FAILED)
        return 4;
    uint64_t sum = 0xCBF29CE484222325ULL;
    for (size_t i = 0; i < words; i++) {
        memory[i] = expected(i);
        sum = mix(sum, memory[i]);
    }
    char text[128], beat_path[512], verify_path[512];
    snprintf(text, sizeof text, "filled %016llx\n", (unsigned long long)sum);
    write_file(dir, "state", text);
    snprintf(beat_path, sizeof beat_path, "%s/beat", dir);
    snprintf(verify_path, sizeof verify_path, "%s/verify", dir);
    for (unsigned long beat = 1;; beat++) {
        int fd = open(beat_path, O_WRONLY | O_CREAT, 0644);
        if (fd >= 0) {
            snprintf(text, sizeof text, "%012lu\n", beat);
            if (write(fd, text, 13) != 13)
                _exit(3);
            close(fd);
        }
        if (unlink(verify_path) == 0) {
            uint64_t check = 0xCBF29CE484222325ULL;
            size_t mismatches = 0;
            for (size_t i = 0; i < words; i++) {
                mismatches += memory[i] != expected(i);
                check = mix(check, memory[i]);
            }
            snprintf(text, sizeof text, "verified %zu %016llx\n", mismatches, (unsigned long long)check);
            write_file(dir, "result", text);
        }
        struct timespec pause = {0, 20 * 1000 * 1000};
        nanosleep(&pause, NULL);
    }
}
