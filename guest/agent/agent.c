/* rrr-agent: PID 1 of every rootfs rrr builds.
 *
 * It mounts the pseudo filesystems a syzkaller reproducer expects, tells the VMM it is READY (the
 * snapshot point), waits for GO (which carries the time limit), loads the stimulus from the
 * stimulus disk (or runs /stimulus from the rootfs when there is none), reports how it ended,
 * and powers the machine off. Everything it says to the VMM goes through the control port
 * (rrr_protocol.h); everything it says to a human goes to the console.
 *
 * Built with `gcc -O2 -static`. It uses only syscalls a tinyconfig kernel has: no timers beyond
 * nanosleep (a tiny kernel may lack POSIX timers, so the time limit is a sleeping child process),
 * no signal handlers, no threads. */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <signal.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/io.h>
#include <sys/mount.h>
#include <sys/reboot.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include "rrr_protocol.h"

#define ROOTFS_STIMULUS "/stimulus"
#define LOADED_STIMULUS "/run/stimulus"
#define STIMULUS_DISK "/dev/vdb"
#define STIMULUS_CWD "/tmp/stimulus-cwd"
#define ALL_ONES 0xffffffffu

static int have_port;
/* Whether the stimulus may write the progress port (its trace-pc runtime checks RRR_PROGRESS). */
static int have_progress_port;
/* Whether the stimulus may read the TSC and random ports (its traps.c checks RRR_TRAPS). */
static int have_trap_ports;
/* Whether an rrr VMM answered on the control port. */
static int have_vmm;

static void say(const char *fmt, ...) __attribute__((format(printf, 1, 2)));
static void say(const char *fmt, ...)
{
	char buf[512];
	int len = snprintf(buf, sizeof(buf), "rrr-agent: ");
	va_list ap;
	va_start(ap, fmt);
	len += vsnprintf(buf + len, sizeof(buf) - len - 1, fmt, ap);
	va_end(ap);
	if (len > (int)sizeof(buf) - 2)
		len = sizeof(buf) - 2;
	buf[len++] = '\n';
	/* One write per line so the agent's lines never interleave with the stimulus's. */
	if (write(STDOUT_FILENO, buf, len) < 0)
		(void)write(STDERR_FILENO, buf, len);
}

static void port_out(uint32_t word)
{
	if (have_port)
		__asm__ volatile("outl %0, %1" : : "a"(word), "Nd"((uint16_t)RRR_CONTROL_PORT));
}

static uint32_t port_in(void)
{
	uint32_t word = ALL_ONES;
	if (have_port)
		__asm__ volatile("inl %1, %0" : "=a"(word) : "Nd"((uint16_t)RRR_CONTROL_PORT));
	return word;
}

static void send(uint32_t cmd, uint32_t arg)
{
	port_out((cmd << 24) | (arg & RRR_ARG_MASK));
}

struct mount_point {
	const char *source, *target, *type, *data;
	unsigned long flags;
};

/* Order matters: each target lives on a filesystem mounted above it. */
static const struct mount_point mounts[] = {
	{ "proc", "/proc", "proc", NULL, MS_NOSUID | MS_NODEV | MS_NOEXEC },
	{ "sysfs", "/sys", "sysfs", NULL, MS_NOSUID | MS_NODEV | MS_NOEXEC },
	{ "devpts", "/dev/pts", "devpts", "mode=0620,ptmxmode=0666", MS_NOSUID | MS_NOEXEC },
	{ "tmpfs", "/dev/shm", "tmpfs", "mode=1777", MS_NOSUID | MS_NODEV },
	{ "tmpfs", "/tmp", "tmpfs", "mode=1777", MS_NOSUID | MS_NODEV },
	{ "tmpfs", "/run", "tmpfs", "mode=0755", MS_NOSUID | MS_NODEV },
	{ "debugfs", "/sys/kernel/debug", "debugfs", NULL, 0 },
	{ "configfs", "/sys/kernel/config", "configfs", NULL, 0 },
	{ "securityfs", "/sys/kernel/security", "securityfs", NULL, 0 },
	{ "tracefs", "/sys/kernel/tracing", "tracefs", NULL, 0 },
	{ "binfmt_misc", "/proc/sys/fs/binfmt_misc", "binfmt_misc", NULL, 0 },
	{ "cgroup2", "/sys/fs/cgroup", "cgroup2", NULL, 0 },
};

static void mount_one(const struct mount_point *m)
{
	/* Targets on proc and sysfs exist only when the kernel has the feature; mkdir there fails
	 * harmlessly and the mount reports the real reason. */
	mkdir(m->target, 0755);
	if (mount(m->source, m->target, m->type, m->flags, m->data) < 0)
		say("mount %s on %s failed: %s", m->type, m->target, strerror(errno));
}

/* The kernel could not open /dev/console for us before devtmpfs was mounted, so stdio is set up
 * here; until then there is nowhere to print, so a devtmpfs failure is reported afterwards. */
static void setup_console(void)
{
	int devtmpfs_errno = 0;
	mkdir("/dev", 0755);
	/* EBUSY: the kernel mounted it already (CONFIG_DEVTMPFS_MOUNT). */
	if (mount("devtmpfs", "/dev", "devtmpfs", MS_NOSUID, "mode=0755") < 0 && errno != EBUSY)
		devtmpfs_errno = errno;
	int fd = open("/dev/console", O_RDWR | O_NOCTTY);
	if (fd >= 0) {
		for (int i = 0; i < 3; i++)
			if (fd != i)
				dup2(fd, i);
		if (fd > 2)
			close(fd);
	}
	if (devtmpfs_errno)
		say("mount devtmpfs on /dev failed: %s", strerror(devtmpfs_errno));
	mkdir("/dev/pts", 0755);
	mkdir("/dev/shm", 01777);
}

/* READY is the VMM's snapshot point; the reply to the inl that follows carries GO and the time
 * limit. All-ones means nothing decodes the port (plain QEMU): run at once with no limit. */
static uint32_t wait_for_go(void)
{
	send(RRR_CMD_READY, 0);
	for (unsigned long tries = 0;; tries++) {
		uint32_t word = port_in();
		if (word == ALL_ONES) {
			say("no rrr VMM on port %#x (read all-ones); running the stimulus with no time limit",
			    RRR_CONTROL_PORT);
			return 0;
		}
		if ((word >> 24) == RRR_GO) {
			have_vmm = 1;
			return word & RRR_ARG_MASK;
		}
		if (tries == 1000)
			say("still waiting for GO (port reads %#x)", word);
	}
}

/* The stimulus disk is read only after GO and with O_DIRECT, so a snapshot taken at READY holds
 * nothing of any stimulus: one snapshot serves them all. Returns the path to execute, or NULL
 * (with errno set) when the disk exists but holds no valid stimulus. Without a stimulus disk
 * (plain QEMU, an image built with its stimulus inside) it is /stimulus on the rootfs. */
static const char *load_stimulus(void)
{
	int disk = open(STIMULUS_DISK, O_RDONLY | O_DIRECT | O_CLOEXEC);
	if (disk < 0) {
		if (errno != ENOENT && errno != ENXIO && errno != ENODEV)
			say("cannot open %s: %s; running %s", STIMULUS_DISK, strerror(errno),
			    ROOTFS_STIMULUS);
		return ROOTFS_STIMULUS;
	}
	const size_t block = RRR_STIMULUS_DATA_OFFSET;
	unsigned char *buf = NULL;
	if (posix_memalign((void **)&buf, block, block) != 0) {
		close(disk);
		errno = ENOMEM;
		return NULL;
	}
	const char *result = NULL;
	int out = -1;
	if (pread(disk, buf, block, 0) != (ssize_t)block) {
		say("cannot read the stimulus disk header: %s", strerror(errno));
		errno = EIO;
		goto done;
	}
	if (memcmp(buf, RRR_STIMULUS_MAGIC, 8) != 0) {
		say("the stimulus disk holds no stimulus (no %s header)", RRR_STIMULUS_MAGIC);
		errno = ENOEXEC;
		goto done;
	}
	uint64_t len;
	memcpy(&len, buf + 8, sizeof(len));
	if (len == 0 || len > (uint64_t)RRR_STIMULUS_DISK_BYTES - block) {
		say("the stimulus disk claims a %llu-byte stimulus", (unsigned long long)len);
		errno = ENOEXEC;
		goto done;
	}
	out = open(LOADED_STIMULUS, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0755);
	if (out < 0) {
		say("cannot create %s: %s", LOADED_STIMULUS, strerror(errno));
		goto done;
	}
	for (uint64_t done = 0; done < len; done += block) {
		if (pread(disk, buf, block, block + done) != (ssize_t)block) {
			say("cannot read the stimulus at byte %llu: %s", (unsigned long long)done,
			    strerror(errno));
			errno = EIO;
			goto done;
		}
		size_t want = len - done < block ? (size_t)(len - done) : block;
		if (write(out, buf, want) != (ssize_t)want) {
			say("cannot write %s: %s", LOADED_STIMULUS, strerror(errno));
			goto done;
		}
	}
	if (close(out) < 0) {
		out = -1;
		goto done;
	}
	out = -1;
	result = LOADED_STIMULUS;
done:
	if (out >= 0)
		close(out);
	free(buf);
	close(disk);
	return result;
}

/* Returns the pid, or -errno when the stimulus could not be executed. A close-on-exec pipe carries
 * execve's errno back, so "did it start" is known before STARTED is sent. */
static pid_t spawn_stimulus(const char *path)
{
	int pipefd[2];
	if (pipe2(pipefd, O_CLOEXEC) < 0)
		return -errno;
	pid_t pid = fork();
	if (pid < 0) {
		int err = errno;
		close(pipefd[0]);
		close(pipefd[1]);
		return -err;
	}
	if (pid == 0) {
		close(pipefd[0]);
		/* Its own session and process group, so a time-out can kill everything it forked. */
		setsid();
		sigset_t none;
		sigemptyset(&none);
		sigprocmask(SIG_SETMASK, &none, NULL);
		if (chdir(STIMULUS_CWD) < 0)
			(void)chdir("/");
		char *const argv[] = { (char *)path, NULL };
		char *envp[6] = { "PATH=/sbin:/usr/sbin:/bin:/usr/bin", "HOME=/root", "TERM=linux" };
		int envc = 3;
		if (have_progress_port)
			envp[envc++] = "RRR_PROGRESS=1";
		/* Only an rrr VMM decodes the trap ports: elsewhere (plain QEMU) they read all-ones,
		 * and the stimulus's rdtsc is better left to the hardware. */
		if (have_trap_ports && have_vmm)
			envp[envc++] = "RRR_TRAPS=1";
		envp[envc] = NULL;
		execve(path, argv, envp);
		int err = errno;
		(void)write(pipefd[1], &err, sizeof(err));
		_exit(127);
	}
	close(pipefd[1]);
	int err = 0;
	ssize_t n;
	do
		n = read(pipefd[0], &err, sizeof(err));
	while (n < 0 && errno == EINTR);
	close(pipefd[0]);
	if (n == (ssize_t)sizeof(err)) {
		waitpid(pid, NULL, 0);
		return -err;
	}
	return pid;
}

/* A child that sleeps for the limit and exits: its exit wakes PID 1's wait. It needs only
 * nanosleep, which every kernel has, where alarm()/setitimer need CONFIG_POSIX_TIMERS. */
static pid_t start_timer(uint32_t seconds)
{
	pid_t pid = fork();
	if (pid == 0) {
		struct timespec ts = { .tv_sec = seconds, .tv_nsec = 0 };
		while (nanosleep(&ts, &ts) < 0 && errno == EINTR)
			;
		_exit(0);
	}
	if (pid < 0)
		say("cannot start the time-limit timer: %s; running with no limit", strerror(errno));
	return pid;
}

/* Waits for the stimulus, reaping every orphan that PID 1 inherits on the way. */
static void supervise(pid_t stimulus, uint32_t limit)
{
	pid_t timer = limit ? start_timer(limit) : -1;
	int timed_out = 0, status = 0;
	for (;;) {
		int st;
		pid_t pid = waitpid(-1, &st, 0);
		if (pid < 0) {
			if (errno == EINTR)
				continue;
			say("wait failed: %s", strerror(errno));
			break;
		}
		if (pid == timer && !timed_out) {
			timer = -1;
			timed_out = 1;
			kill(-stimulus, SIGKILL);
			kill(stimulus, SIGKILL);
			continue;
		}
		if (pid == stimulus) {
			status = st;
			break;
		}
	}
	if (timer > 0) {
		kill(timer, SIGKILL);
		waitpid(timer, NULL, 0);
	}

	if (timed_out) {
		send(RRR_CMD_TIMED_OUT, limit);
		say("stimulus timed out after %u s and was killed", limit);
	} else if (WIFEXITED(status)) {
		send(RRR_CMD_EXITED, WEXITSTATUS(status));
		say("stimulus exited with status %d", WEXITSTATUS(status));
	} else if (WIFSIGNALED(status)) {
		send(RRR_CMD_SIGNALED, WTERMSIG(status));
		say("stimulus killed by signal %d (%s)", WTERMSIG(status), strsignal(WTERMSIG(status)));
	}
}

/* Under rrr the VMM ends the run at POWER_OFF. Without it, a machine with no ACPI (QEMU microvm)
 * cannot power off and the kernel would halt forever; a restart instead ends QEMU when it runs
 * with -no-reboot, and the kernel's last-resort restart (a triple fault) works on any machine. */
static void power_off(void)
{
	send(RRR_CMD_POWER_OFF, 0);
	sync();
	if (have_vmm) {
		say("powering off");
		reboot(RB_POWER_OFF);
	} else {
		say("restarting (without rrr, so QEMU -no-reboot exits)");
		reboot(RB_AUTOBOOT);
	}
	/* PID 1 must never exit: that panics the kernel. */
	say("power off failed: %s", strerror(errno));
	for (;;)
		pause();
}

int main(void)
{
	if (getpid() != 1) {
		fprintf(stderr, "rrr-agent: must run as PID 1 (it mounts, then powers the machine off)\n");
		return 1;
	}
	setup_console();
	for (size_t i = 0; i < sizeof(mounts) / sizeof(mounts[0]); i++)
		mount_one(&mounts[i]);
	mkdir(STIMULUS_CWD, 0777);
	if (sethostname("rrr", 3) < 0)
		say("sethostname failed: %s", strerror(errno));
	setenv("PATH", "/sbin:/usr/sbin:/bin:/usr/bin", 1);
	setenv("HOME", "/root", 1);

	/* ioperm is inherited across fork and exec, so the stimulus (and instrumented code in it)
	 * can reach the control port too. */
	if (ioperm(RRR_CONTROL_PORT, RRR_CONTROL_PORT_LEN, 1) == 0)
		have_port = 1;
	else
		say("ioperm(%#x) failed: %s; cannot talk to the VMM", RRR_CONTROL_PORT, strerror(errno));
	if (ioperm(RRR_PROGRESS_PORT, RRR_PROGRESS_PORT_LEN, 1) == 0)
		have_progress_port = 1;
	else
		say("ioperm(%#x) failed: %s; the stimulus runs without progress exits",
		    RRR_PROGRESS_PORT, strerror(errno));
	if (ioperm(RRR_TSC_PORT, RRR_TSC_PORT_LEN, 1) == 0 &&
	    ioperm(RRR_RANDOM_PORT, RRR_RANDOM_PORT_LEN, 1) == 0)
		have_trap_ports = 1;
	else
		say("ioperm(%#x, %#x) failed: %s; the stimulus's rdtsc reads the host's TSC",
		    RRR_TSC_PORT, RRR_RANDOM_PORT, strerror(errno));

	if (ioperm(RRR_FUNC_PROBE_PORT, RRR_FUNC_PROBE_PORT_LEN, 1) != 0)
		say("ioperm(%#x) failed: %s; a trace shows no stimulus functions", RRR_FUNC_PROBE_PORT,
		    strerror(errno));

	uint32_t limit = wait_for_go();
	const char *stimulus = load_stimulus();
	pid_t pid;
	if (!stimulus) {
		pid = -(errno ? errno : ENOEXEC);
		stimulus = STIMULUS_DISK;
	} else {
		if (limit)
			say("running %s with a time limit of %u s", stimulus, limit);
		else
			say("running %s", stimulus);
		pid = spawn_stimulus(stimulus);
	}
	if (pid < 0) {
		send(RRR_CMD_SPAWN_FAILED, -pid);
		say("cannot run %s: %s", stimulus, strerror(-pid));
	} else {
		send(RRR_CMD_STARTED, pid);
		supervise(pid, limit);
	}
	power_off();
	return 0;
}
