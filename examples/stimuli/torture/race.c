/* Torture: four threads race on a shared counter with no lock, and log who got each slot of a
 * shared array. The interleaving depends only on where the timer preempts them, which
 * deterministic replay must reproduce exactly. */
#define _GNU_SOURCE
#include <pthread.h>
#include <stdatomic.h>
#include <stdio.h>

#define THREADS 4
#define ROUNDS 200000
#define SLOTS 4096

static volatile long counter;
static atomic_int next_slot;
static char owner[SLOTS];

static void *worker(void *arg)
{
	char id = (char)(long)arg;
	for (int i = 0; i < ROUNDS; i++) {
		counter++; /* racy on purpose */
		if (i % 64 == 0) {
			int slot = atomic_fetch_add(&next_slot, 1);
			if (slot < SLOTS)
				owner[slot] = id;
		}
	}
	return NULL;
}

int main(void)
{
	pthread_t t[THREADS];
	for (long i = 0; i < THREADS; i++)
		pthread_create(&t[i], NULL, worker, (void *)('A' + i));
	for (int i = 0; i < THREADS; i++)
		pthread_join(t[i], NULL);
	int used = atomic_load(&next_slot) < SLOTS ? atomic_load(&next_slot) : SLOTS;
	/* The interleaving as runs of one owner: "A17 B3 A2 ..." */
	printf("race: counter %ld of %d, slots %d\n", counter, THREADS * ROUNDS, used);
	int runs = 0;
	for (int i = 0; i < used;) {
		int j = i;
		while (j < used && owner[j] == owner[i])
			j++;
		printf("%c%d%s", owner[i], j - i, ++runs % 16 ? " " : "\n");
		i = j;
	}
	printf("\nrace: %d runs\n", runs);
	return 0;
}
