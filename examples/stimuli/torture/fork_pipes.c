/* Torture: a ring of four processes joined by pipes passes a token around; each hop is logged
 * with the hop number and the process that made it. */
#include <stdio.h>
#include <stdlib.h>
#include <sys/wait.h>
#include <unistd.h>

#define PROCS 4
#define HOPS 400

int main(void)
{
	int pipes[PROCS][2];
	for (int i = 0; i < PROCS; i++)
		if (pipe(pipes[i]) < 0)
			return 1;
	setvbuf(stdout, NULL, _IONBF, 0);
	/* Processes 1..PROCS-1 are children; the parent is process 0 and starts the token. */
	int me = 0;
	for (int i = 1; i < PROCS; i++) {
		pid_t pid = fork();
		if (pid < 0)
			return 1;
		if (pid == 0) {
			me = i;
			break;
		}
	}
	if (me == 0) {
		int token = 0;
		if (write(pipes[1][1], &token, sizeof(token)) != sizeof(token))
			return 1;
	}
	for (;;) {
		int token;
		if (read(pipes[me][0], &token, sizeof(token)) != sizeof(token))
			break;
		if (token >= HOPS) {
			int stop = HOPS;
			(void)write(pipes[(me + 1) % PROCS][1], &stop, sizeof(stop));
			break;
		}
		if (token % 50 == 0)
			printf("fork_pipes: hop %d by process %d\n", token, me);
		token++;
		if (write(pipes[(me + 1) % PROCS][1], &token, sizeof(token)) != sizeof(token))
			break;
	}
	if (me != 0)
		_exit(0);
	while (wait(NULL) > 0)
		;
	printf("fork_pipes: done\n");
	return 0;
}
