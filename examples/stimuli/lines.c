/* lines.c: prints 300 numbered lines, for checks that the whole console is kept (run record,
 * closed stdout). */
#include <stdio.h>

int main(void)
{
	for (int i = 1; i <= 300; i++)
		printf("lines: line %d of 300\n", i);
	return 0;
}
