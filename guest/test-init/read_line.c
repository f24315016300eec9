/*
 * A tiny static init for rrr's console-input test. It says it is ready, reads one line from the
 * console (the serial port, which `rrr boot` feeds from its stdin), prints it back behind a
 * marker and powers the machine off:
 *   rrr-test: marker=READ_LINE_READY
 *   rrr-test: line=<the line, without its newline>
 * End of input before a newline prints what came (possibly nothing) the same way.
 * Build: gcc -O2 -static -o init read_line.c
 */
#include <stdio.h>
#include <sys/reboot.h>
#include <unistd.h>

int main(void)
{
	char line[256];
	size_t len = 0;

	setvbuf(stdout, NULL, _IONBF, 0);
	printf("rrr-test: marker=READ_LINE_READY\n");

	/* fd 0 is /dev/console, opened by the kernel; the tty hands over a whole line at a time. */
	while (len < sizeof(line) - 1) {
		ssize_t n = read(0, line + len, 1);
		if (n <= 0 || line[len] == '\n')
			break;
		len++;
	}
	line[len] = 0;
	printf("rrr-test: line=%s\n", line);

	sync();
	reboot(RB_POWER_OFF);
	printf("rrr-test: reboot(RB_POWER_OFF) returned\n");
	return 1;
}
