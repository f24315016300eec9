/* Torture: a periodic POSIX timer, alarm() and nanosleep racing each other; the order in which
 * their signals and wake-ups land is printed. */
#define _GNU_SOURCE
#include <signal.h>
#include <stdio.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

static volatile sig_atomic_t ticks, alarmed;
static char order[256];
static volatile sig_atomic_t len;

static void note(char c)
{
	if (len < (int)sizeof(order) - 1)
		order[len++] = c;
}

static void on_tick(int sig)
{
	(void)sig;
	ticks++;
	note('t');
}

static void on_alarm(int sig)
{
	(void)sig;
	alarmed = 1;
	note('A');
}

int main(void)
{
	struct sigaction sa;
	memset(&sa, 0, sizeof(sa));
	sa.sa_handler = on_tick;
	sigaction(SIGRTMIN, &sa, NULL);
	sa.sa_handler = on_alarm;
	sigaction(SIGALRM, &sa, NULL);

	struct sigevent sev;
	memset(&sev, 0, sizeof(sev));
	sev.sigev_notify = SIGEV_SIGNAL;
	sev.sigev_signo = SIGRTMIN;
	timer_t timer;
	if (timer_create(CLOCK_MONOTONIC, &sev, &timer) < 0) {
		perror("timer_create");
		return 1;
	}
	struct itimerspec its = { { 0, 7000000 }, { 0, 7000000 } };
	timer_settime(timer, 0, &its, NULL);
	alarm(1);
	for (int i = 0; !alarmed && i < 1000; i++) {
		struct timespec nap = { 0, 5000000 };
		nanosleep(&nap, NULL);
		note('s');
	}
	order[len] = 0;
	printf("timers: %d ticks, alarm %d\n", (int)ticks, (int)alarmed);
	for (int i = 0; i < len; i += 64)
		printf("timers: %.64s\n", order + i);
	return 0;
}
