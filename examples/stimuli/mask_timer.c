/* mask_timer.c: masks every interrupt line at the PIC, then sleeps. The kernel idles with its
 * timer interrupt masked and nothing can wake it again, so the VMM stops the VM with a fault
 * after the stimulus started: a test that the run's verdict still knows it started. */
#include <stdio.h>
#include <sys/io.h>
#include <unistd.h>

int main(void)
{
	printf("mask_timer: masking the PIC\n");
	fflush(stdout);
	if (ioperm(0x21, 1, 1) != 0) {
		perror("mask_timer: ioperm (kernel without CONFIG_X86_IOPL_IOPERM?)");
		return 1;
	}
	outb(0xff, 0x21);
	sleep(5);
	/* Only reached if the timer still ticks. */
	printf("mask_timer: still running\n");
	return 1;
}
