/*
 * A tiny static init for rrr's boot tests. It reports what the tests assert on, one
 * "rrr-test: key=value" line each, then powers the machine off:
 *   - a start marker,
 *   - the current clocksource (we expect jiffies: the guest must not trust the TSC),
 *   - whether /proc/interrupts shows XT-PIC (PIC mode, no APIC),
 *   - whether the kernel log says it kept PIC mode,
 *   - a done marker.
 * Build: gcc -O2 -static -o init init.c
 */
#include <fcntl.h>
#include <stdio.h>
#include <string.h>
#include <sys/klog.h>
#include <sys/mount.h>
#include <sys/reboot.h>
#include <sys/stat.h>
#include <unistd.h>

static char buf[1 << 17];

static const char *read_file(const char *path)
{
	int fd = open(path, O_RDONLY);
	if (fd < 0)
		return NULL;
	ssize_t total = 0, n;
	while ((n = read(fd, buf + total, sizeof(buf) - 1 - total)) > 0)
		total += n;
	close(fd);
	buf[total] = 0;
	return buf;
}

int main(void)
{
	mkdir("/proc", 0555);
	mkdir("/sys", 0555);
	mount("proc", "/proc", "proc", 0, NULL);
	mount("sysfs", "/sys", "sysfs", 0, NULL);
	setvbuf(stdout, NULL, _IONBF, 0);

	printf("rrr-test: marker=RRR_INIT_STARTED\n");

	const char *cs = read_file("/sys/devices/system/clocksource/clocksource0/current_clocksource");
	printf("rrr-test: clocksource=%s", cs ? cs : "unreadable\n");

	const char *irqs = read_file("/proc/interrupts");
	printf("rrr-test: xt-pic=%s\n", irqs && strstr(irqs, "XT-PIC") ? "yes" : "no");

	int len = klogctl(3 /* SYSLOG_ACTION_READ_ALL */, buf, sizeof(buf) - 1);
	if (len >= 0) {
		buf[len] = 0;
		printf("rrr-test: pic-mode-log=%s\n", strstr(buf, "Keep in PIC mode") ? "yes" : "no");
	} else {
		printf("rrr-test: pic-mode-log=unreadable\n");
	}

	printf("rrr-test: marker=RRR_INIT_DONE\n");
	sync();
	reboot(RB_POWER_OFF);
	printf("rrr-test: reboot(RB_POWER_OFF) returned\n");
	return 1;
}
