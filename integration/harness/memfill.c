/* memfill: a workload with a known amount of touched memory, for the migration tests and benchmark.
 *
 *   memfill MIB PORT
 *
 * Fills MIB MiB of private anonymous memory with a pattern (64-bit word i holds i * K ^ SEED), then serves TCP
 * on PORT, one line per request, any number of clients (poll):
 *   ping   -> "pong N"   N: requests served so far (state only the process's memory holds)
 *   check  -> "ok MIB" when every word still holds its pattern, "bad I" naming the first word that does not
 *   drop   -> "dropped N": one page in every 64 KiB given back (madvise MADV_DONTNEED), then written again with
 *             its pattern: what an allocator freeing and reusing memory does (a lazy restore gets a REMOVE event)
 *   forkcheck -> "child ok MIB" / "child bad I": a forked child checks every word, as check does, and exits
 * Static (gcc -static): no library of the host is needed inside the container.
 */
#include <errno.h>
#include <netinet/in.h>
#include <poll.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <unistd.h>

#define MAX_CLIENTS 32
#define K 0x9E3779B97F4A7C15ULL
#define SEED 0x5A5A1234C0FFEEULL

static uint64_t *memory;
static size_t words;
static size_t mib;
static unsigned long served;

struct client {
    int fd;
    char buf[256];
    size_t len;
};

static void fill(void) {
    for (size_t i = 0; i < words; i++)
        memory[i] = (uint64_t)i * K ^ SEED;
}

static long check(void) {
    for (size_t i = 0; i < words; i++)
        if (memory[i] != ((uint64_t)i * K ^ SEED))
            return (long)i;
    return -1;
}

static size_t drop(void) {
    size_t page = (size_t)sysconf(_SC_PAGESIZE), step = 64 * 1024, count = 0;
    for (size_t offset = 0; offset + page <= words * sizeof(uint64_t); offset += step, count++) {
        if (madvise((char *)memory + offset, page, MADV_DONTNEED) != 0)
            perror("madvise");
        for (size_t i = offset / sizeof(uint64_t); i < (offset + page) / sizeof(uint64_t); i++)
            memory[i] = (uint64_t)i * K ^ SEED;
    }
    return count;
}

/* The child's exit status: 0 when every word holds its pattern, 1 otherwise (the index is not passed back). */
static long forkcheck(void) {
    pid_t child = fork();
    if (child == 0)
        _exit(check() < 0 ? 0 : 1);
    int status = 0;
    if (child < 0 || waitpid(child, &status, 0) != child)
        return -2;
    return WIFEXITED(status) && WEXITSTATUS(status) == 0 ? -1 : 1;
}

static void answer(int fd, const char *line) {
    char out[96];
    int n;
    served++;
    if (strcmp(line, "ping") == 0) {
        n = snprintf(out, sizeof out, "pong %lu\n", served);
    } else if (strcmp(line, "check") == 0) {
        long bad = check();
        n = bad < 0 ? snprintf(out, sizeof out, "ok %zu\n", mib) : snprintf(out, sizeof out, "bad %ld\n", bad);
    } else if (strcmp(line, "drop") == 0) {
        n = snprintf(out, sizeof out, "dropped %zu\n", drop());
    } else if (strcmp(line, "forkcheck") == 0) {
        long result = forkcheck();
        n = result == -1 ? snprintf(out, sizeof out, "child ok %zu\n", mib)
                         : snprintf(out, sizeof out, "child bad %ld\n", result);
    } else {
        n = snprintf(out, sizeof out, "unknown\n");
    }
    /* Answers are short: a blocking send on a connected socket completes at once or fails. */
    if (send(fd, out, (size_t)n, MSG_NOSIGNAL) < 0 && errno != EPIPE && errno != ECONNRESET)
        perror("send");
}

int main(int argc, char **argv) {
    if (argc != 3) {
        fprintf(stderr, "usage: memfill MIB PORT\n");
        return 2;
    }
    mib = strtoul(argv[1], NULL, 10);
    words = mib * (1024 * 1024 / sizeof(uint64_t));
    memory = mmap(NULL, words * sizeof(uint64_t) + 1, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (memory == MAP_FAILED) {
        perror("mmap");
        return 1;
    }
    fill();

    int listener = socket(AF_INET, SOCK_STREAM, 0);
    int one = 1;
    setsockopt(listener, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
    struct sockaddr_in address = {.sin_family = AF_INET, .sin_port = htons((uint16_t)atoi(argv[2]))};
    if (bind(listener, (struct sockaddr *)&address, sizeof address) < 0 || listen(listener, 16) < 0) {
        perror("bind/listen");
        return 1;
    }
    printf("ready %zu MiB\n", mib);
    fflush(stdout);

    struct client clients[MAX_CLIENTS];
    struct pollfd fds[MAX_CLIENTS + 1];
    size_t count = 0;
    for (;;) {
        fds[0] = (struct pollfd){.fd = listener, .events = POLLIN};
        for (size_t i = 0; i < count; i++)
            fds[i + 1] = (struct pollfd){.fd = clients[i].fd, .events = POLLIN};
        if (poll(fds, count + 1, -1) < 0) {
            if (errno == EINTR)
                continue;
            perror("poll");
            return 1;
        }
        for (size_t i = count; i-- > 0;) {
            if (!(fds[i + 1].revents & (POLLIN | POLLHUP | POLLERR)))
                continue;
            struct client *c = &clients[i];
            ssize_t got = recv(c->fd, c->buf + c->len, sizeof c->buf - 1 - c->len, 0);
            if (got <= 0) {
                close(c->fd);
                clients[i] = clients[--count];
                continue;
            }
            c->len += (size_t)got;
            char *start = c->buf, *end;
            while ((end = memchr(start, '\n', c->len - (size_t)(start - c->buf))) != NULL) {
                *end = '\0';
                answer(c->fd, start);
                start = end + 1;
            }
            c->len -= (size_t)(start - c->buf);
            memmove(c->buf, start, c->len);
            if (c->len == sizeof c->buf - 1)
                c->len = 0; /* a line longer than any request: dropped */
        }
        if (fds[0].revents & POLLIN) {
            int fd = accept(listener, NULL, NULL);
            if (fd >= 0 && count < MAX_CLIENTS)
                clients[count++] = (struct client){.fd = fd, .len = 0};
            else if (fd >= 0)
                close(fd);
        }
    }
}
