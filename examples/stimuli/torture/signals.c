/* Torture: threads signalling each other. Each of three threads sends a real-time signal (they
 * queue; SIGUSR1 would merge) to the next one in a ring, many times; the handler logs which thread took each signal and in what order. */
#define _GNU_SOURCE
#include <pthread.h>
#include <signal.h>
#include <stdatomic.h>
#include <stdio.h>
#include <string.h>
#include <sys/syscall.h>
#include <unistd.h>

#define THREADS 3
#define SIGNALS 100

static pid_t tids[THREADS];
static atomic_int ready, received[THREADS], log_len;
static char log_buf[THREADS * SIGNALS + 1];
static __thread int self;

static void on_signal(int sig)
{
	(void)sig;
	atomic_fetch_add(&received[self], 1);
	int at = atomic_fetch_add(&log_len, 1);
	if (at < (int)sizeof(log_buf) - 1)
		log_buf[at] = (char)('a' + self);
}

static void *member(void *arg)
{
	self = (int)(long)arg;
	tids[self] = (pid_t)syscall(SYS_gettid);
	atomic_fetch_add(&ready, 1);
	while (atomic_load(&ready) < THREADS)
		sched_yield();
	pid_t pid = getpid();
	for (int i = 0; i < SIGNALS; i++) {
		syscall(SYS_tgkill, pid, tids[(self + 1) % THREADS], SIGRTMIN + 1);
		if (i % 7 == 0)
			sched_yield();
	}
	while (atomic_load(&received[self]) < SIGNALS)
		sched_yield();
	return NULL;
}

int main(void)
{
	struct sigaction sa;
	memset(&sa, 0, sizeof(sa));
	sa.sa_handler = on_signal;
	sa.sa_flags = SA_RESTART;
	sigaction(SIGRTMIN + 1, &sa, NULL);
	pthread_t t[THREADS];
	for (long i = 0; i < THREADS; i++)
		pthread_create(&t[i], NULL, member, (void *)i);
	for (int i = 0; i < THREADS; i++)
		pthread_join(t[i], NULL);
	int n = atomic_load(&log_len);
	printf("signals: %d %d %d received\n", received[0], received[1], received[2]);
	for (int i = 0; i < n; i += 75)
		printf("signals: %.75s\n", log_buf + i);
	return 0;
}
