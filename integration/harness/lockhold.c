/* lockhold: a container process that holds a file lock and says whether it still holds it.
 *
 *   lockhold LOCKFILE STATUSFILE   take an exclusive flock on LOCKFILE (exit 1 if another process has it), then
 *                                  every 50 ms write "<count> held" or "<count> lost" to STATUSFILE
 *   lockhold -t LOCKFILE           try the lock without waiting: print "free" (exit 0) or "busy" (exit 1)
 *
 * "held" is the kernel's word, not a flag kept in memory: /proc/self/fdinfo of the lock's descriptor lists a FLOCK
 * WRITE lock. The status is rewritten in place at a fixed size, so the file never changes size (CRIU checks the size
 * of every open file on restore). Built statically by integration/harness/lockhold.py.
 */
#include <fcntl.h>
#include <stdio.h>
#include <string.h>
#include <sys/file.h>
#include <unistd.h>

static int holds(int fd)
{
	char path[64], line[256];
	FILE *info;
	int found = 0;

	snprintf(path, sizeof(path), "/proc/self/fdinfo/%d", fd);
	info = fopen(path, "re");
	if (!info)
		return 0;
	while (fgets(line, sizeof(line), info))
		if (!strncmp(line, "lock:", 5) && strstr(line, "FLOCK") && strstr(line, "WRITE"))
			found = 1;
	fclose(info);
	return found;
}

static void report(const char *path, unsigned long count, const char *word)
{
	char text[17];
	int fd = open(path, O_WRONLY | O_CREAT | O_CLOEXEC, 0644);

	if (fd < 0)
		return;
	snprintf(text, sizeof(text), "%010lu %-4s\n", count, word);
	if (pwrite(fd, text, 16, 0) != 16)
		perror("lockhold: status");
	close(fd);
}

int main(int argc, char **argv)
{
	unsigned long count;
	int fd;

	if (argc == 3 && !strcmp(argv[1], "-t")) {
		fd = open(argv[2], O_RDWR | O_CREAT | O_CLOEXEC, 0644);
		if (fd >= 0 && flock(fd, LOCK_EX | LOCK_NB) == 0) {
			puts("free");
			return 0;
		}
		puts("busy");
		return 1;
	}
	if (argc != 3) {
		fprintf(stderr, "usage: lockhold LOCKFILE STATUSFILE | lockhold -t LOCKFILE\n");
		return 2;
	}
	fd = open(argv[1], O_RDWR | O_CREAT | O_CLOEXEC, 0644);
	if (fd < 0 || flock(fd, LOCK_EX | LOCK_NB) != 0) {
		report(argv[2], 0, "busy");
		return 1;
	}
	for (count = 1;; count++) {
		report(argv[2], count, holds(fd) ? "held" : "lost");
		usleep(50000);
	}
}
