/* open_write_close.c: the trace's semantic test. Opens a file by a name no other program uses,
 * writes a known number of bytes, closes it, and opens a missing file (an errno in the trace). */
#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <string.h>
#include <unistd.h>

int main(void)
{
	const char msg[] = "traced by rrr\n";
	int fd = open("rrr-trace-probe.txt", O_CREAT | O_TRUNC | O_WRONLY, 0600);
	if (fd < 0) {
		perror("open");
		return 1;
	}
	if (write(fd, msg, strlen(msg)) != (ssize_t)strlen(msg)) {
		perror("write");
		return 1;
	}
	if (close(fd) != 0) {
		perror("close");
		return 1;
	}
	if (open("rrr-trace-missing.txt", O_RDONLY) >= 0 || errno != ENOENT) {
		fprintf(stderr, "a missing file opened\n");
		return 1;
	}
	printf("fd %d, %zu bytes\n", fd, strlen(msg));
	return 0;
}
