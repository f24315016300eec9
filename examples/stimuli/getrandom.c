/* getrandom.c: random bytes and addresses early in user space, for the test that the boot seed
 * makes them the same on every run (and different with another --seed).
 *
 * Without a seed at boot the kernel's crng is not ready when init starts: getrandom() then waits
 * in the jitter-entropy loop, a spin on the timer that parted runs. With rrr's SETUP_RNG_SEED it
 * returns at once. Printed: 16 random bytes, whether the call had to wait (GRND_NONBLOCK first),
 * and a stack, a heap and an mmap address (ASLR draws from the same crng). */
#define _GNU_SOURCE
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/random.h>

int main(void)
{
	unsigned char bytes[16];
	int waited = 0;
	if (getrandom(bytes, sizeof(bytes), GRND_NONBLOCK) != (ssize_t)sizeof(bytes)) {
		if (errno != EAGAIN) {
			printf("getrandom: %s\n", strerror(errno));
			return 1;
		}
		waited = 1;
		if (getrandom(bytes, sizeof(bytes), 0) != (ssize_t)sizeof(bytes)) {
			printf("getrandom: %s\n", strerror(errno));
			return 1;
		}
	}
	printf("getrandom: crng %s: ", waited ? "was not ready (had to wait)" : "ready");
	for (size_t i = 0; i < sizeof(bytes); i++)
		printf("%02x", bytes[i]);
	printf("\n");
	int local = 0;
	void *heap = malloc(64);
	void *map = mmap(NULL, 4096, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
	printf("getrandom: stack %p heap %p mmap %p\n", (void *)&local, heap, map);
	return 0;
}
