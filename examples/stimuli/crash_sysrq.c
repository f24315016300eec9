/* crash_sysrq.c: crashes the kernel on purpose (sysrq 'c'), to test how rrr reports a panic. */
#include <fcntl.h>
#include <stdio.h>
#include <unistd.h>

int main(void)
{
	int fd = open("/proc/sysrq-trigger", O_WRONLY);
	if (fd < 0) {
		perror("crash_sysrq: open /proc/sysrq-trigger (kernel without CONFIG_MAGIC_SYSRQ?)");
		return 1;
	}
	if (write(fd, "c", 1) != 1)
		perror("crash_sysrq: write");
	/* Only reached if the kernel did not crash. */
	return 1;
}
