/* Torture: console input typed while the stimulus reads it. Reads lines from the console (its
 * stdin) until a line "end", and prints each with its number and length, plus a checksum of
 * everything read. The host's input arrives at host-timed points; a recording logs the exit at
 * which each byte entered, and a replay must hand it over at that same exit. */
#include <stdio.h>
#include <string.h>

int main(void)
{
	char line[256];
	unsigned sum = 0;
	int n = 0;
	setvbuf(stdout, NULL, _IONBF, 0);
	printf("console_input: reading lines until \"end\"\n");
	while (fgets(line, sizeof(line), stdin)) {
		line[strcspn(line, "\r\n")] = 0;
		for (const char *c = line; *c; c++)
			sum = sum * 31 + (unsigned char)*c;
		n++;
		printf("console_input: line %d (%zu bytes): %s\n", n, strlen(line), line);
		if (strcmp(line, "end") == 0)
			break;
	}
	printf("console_input: %d lines, checksum %08x\n", n, sum);
	return 0;
}
