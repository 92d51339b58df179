/* unixpeer: a container process with two unix sockets whose peers are outside the container.
 *
 *   unixpeer DGRAM_PATH|- STREAM_PATH
 *
 * Connects a datagram socket to DGRAM_PATH (none for "-") and a stream socket to STREAM_PATH, sends "hello" on both,
 * then for every line "ping <word>" read from the stream socket answers "pong <word>" on the stream socket and sends
 * "dgram <word>" on the datagram socket. Nothing happens unless the peer asks, so the exchange is deterministic.
 * Exits 3 when the stream peer hangs up, 2 on a usage or socket error. Built statically by
 * integration/harness/unixpeer.py.
 */
#include <errno.h>
#include <stdio.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <unistd.h>

static int connected(int type, const char *path)
{
	struct sockaddr_un addr = { .sun_family = AF_UNIX };
	int sk;

	if (strlen(path) >= sizeof(addr.sun_path)) {
		fprintf(stderr, "unixpeer: path too long: %s\n", path);
		return -1;
	}
	strcpy(addr.sun_path, path);
	sk = socket(AF_UNIX, type, 0);
	if (sk < 0 || connect(sk, (struct sockaddr *)&addr, sizeof(addr)) < 0) {
		fprintf(stderr, "unixpeer: connect %s: %s\n", path, strerror(errno));
		return -1;
	}
	return sk;
}

static int send_all(int sk, const char *data, size_t len)
{
	while (len > 0) {
		ssize_t n = send(sk, data, len, MSG_NOSIGNAL);
		if (n < 0 && errno == EINTR)
			continue;
		if (n < 0)
			return -1;
		data += n;
		len -= (size_t)n;
	}
	return 0;
}

int main(int argc, char **argv)
{
	char buf[512], reply[600];
	size_t have = 0;
	int dgram = -1, stream;

	if (argc != 3) {
		fprintf(stderr, "usage: unixpeer DGRAM_PATH|- STREAM_PATH\n");
		return 2;
	}
	if (strcmp(argv[1], "-") != 0 && (dgram = connected(SOCK_DGRAM, argv[1])) < 0)
		return 2;
	stream = connected(SOCK_STREAM, argv[2]);
	if (stream < 0)
		return 2;
	if ((dgram >= 0 && send_all(dgram, "dgram hello", 11)) || send_all(stream, "hello\n", 6)) {
		perror("unixpeer: hello");
		return 2;
	}
	for (;;) {
		ssize_t n = read(stream, buf + have, sizeof(buf) - 1 - have);
		char *line, *end;

		if (n < 0 && errno == EINTR)
			continue;
		if (n < 0) {
			perror("unixpeer: read");
			return 2;
		}
		if (n == 0) {
			fprintf(stderr, "unixpeer: stream peer hung up\n");
			return 3;
		}
		have += (size_t)n;
		buf[have] = '\0';
		line = buf;
		while ((end = strchr(line, '\n')) != NULL) {
			*end = '\0';
			if (strncmp(line, "ping ", 5) == 0) {
				int len = snprintf(reply, sizeof(reply), "pong %s\n", line + 5);
				if (send_all(stream, reply, (size_t)len)) {
					perror("unixpeer: stream send");
					return 2;
				}
				len = snprintf(reply, sizeof(reply), "dgram %s", line + 5);
				if (dgram >= 0 && send_all(dgram, reply, (size_t)len)) {
					perror("unixpeer: dgram send");
					return 2;
				}
			}
			line = end + 1;
		}
		have = strlen(line);
		memmove(buf, line, have);
		if (have == sizeof(buf) - 1)
			have = 0; /* a line longer than the buffer is dropped */
	}
}
