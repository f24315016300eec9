/* spin_forever.c: never exits, to test the time limit. Alternates a user-mode busy loop with a
 * cheap syscall, like a reproducer stuck in a loop. */
#include <unistd.h>

int main(void)
{
	volatile unsigned long counter = 0;
	for (;;) {
		for (int i = 0; i < 1000000; i++)
			counter++;
		getppid();
	}
}
