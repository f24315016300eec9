/* hello.c: the README's example stimulus. Small, but it touches the common kernel paths a trace
 * should show: file create/write/read, a pipe, and fork + wait. Exits 0 when all went well. */
#include <fcntl.h>
#include <stdio.h>
#include <string.h>
#include <sys/wait.h>
#include <unistd.h>

static int fail(const char *what)
{
	perror(what);
	return 1;
}

int main(void)
{
	const char msg[] = "hello from rrr\n";
	char buf[64] = { 0 };

	int fd = open("hello.txt", O_CREAT | O_TRUNC | O_RDWR, 0644);
	if (fd < 0)
		return fail("open");
	if (write(fd, msg, sizeof(msg) - 1) != (ssize_t)(sizeof(msg) - 1))
		return fail("write");
	if (lseek(fd, 0, SEEK_SET) != 0 || read(fd, buf, sizeof(buf) - 1) < 0)
		return fail("read");
	close(fd);

	int pipefd[2];
	if (pipe(pipefd) < 0)
		return fail("pipe");
	pid_t child = fork();
	if (child < 0)
		return fail("fork");
	if (child == 0) {
		close(pipefd[0]);
		ssize_t n = write(pipefd[1], buf, strlen(buf));
		_exit(n == (ssize_t)strlen(buf) ? 0 : 1);
	}
	close(pipefd[1]);
	char echoed[64] = { 0 };
	ssize_t n = read(pipefd[0], echoed, sizeof(echoed) - 1);
	close(pipefd[0]);
	int status;
	if (waitpid(child, &status, 0) != child || !WIFEXITED(status) || WEXITSTATUS(status) != 0)
		return fail("child");
	if (n <= 0 || strcmp(echoed, msg) != 0) {
		fprintf(stderr, "hello: pipe round trip garbled\n");
		return 1;
	}
	fputs(echoed, stdout);
	return 0;
}
