/* syscalls.c: a system-call-heavy stimulus for scripts/bench-trace: files, a pipe, stat and
 * getpid in a loop, a few thousand system calls in all. */
#include <fcntl.h>
#include <stdio.h>
#include <sys/stat.h>
#include <unistd.h>

int main(void)
{
	char buf[256];
	int pipefd[2];
	struct stat st;
	long total = 0;

	if (pipe(pipefd) != 0)
		return 1;
	for (int i = 0; i < 300; i++) {
		int fd = open("bench.txt", O_CREAT | O_RDWR | O_TRUNC, 0600);
		if (fd < 0)
			return 1;
		total += write(fd, "0123456789abcdef", 16);
		lseek(fd, 0, SEEK_SET);
		total += read(fd, buf, sizeof(buf));
		fstat(fd, &st);
		close(fd);
		stat("bench.txt", &st);
		total += write(pipefd[1], buf, 8);
		total += read(pipefd[0], buf, 8);
		total += getpid() > 0;
	}
	printf("%ld bytes moved\n", total);
	return 0;
}
