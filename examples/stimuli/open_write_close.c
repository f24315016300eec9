/* open_write_close.c: the trace's semantic test. Opens a file by a name no other program uses,
 * writes a known number of bytes and closes it, in a function of its own (the trace shows it
 * between main and those system calls), then opens a missing file (an errno in the trace). */
#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <string.h>
#include <unistd.h>

static const char msg[] = "traced by rrr\n";

/* Not inlined, so that it is a function of its own in the trace. */
__attribute__((noinline)) int write_probe_file(void)
{
	int fd = open("rrr-trace-probe.txt", O_CREAT | O_TRUNC | O_WRONLY, 0600);
	if (fd < 0) {
		perror("open");
		return -1;
	}
	if (write(fd, msg, strlen(msg)) != (ssize_t)strlen(msg)) {
		perror("write");
		return -1;
	}
	if (close(fd) != 0) {
		perror("close");
		return -1;
	}
	return fd;
}

int main(void)
{
	int fd = write_probe_file();
	if (fd < 0)
		return 1;
	if (open("rrr-trace-missing.txt", O_RDONLY) >= 0 || errno != ENOENT) {
		fprintf(stderr, "a missing file opened\n");
		return 1;
	}
	printf("fd %d, %zu bytes\n", fd, strlen(msg));
	return 0;
}
