/* disk_rw.c: writes 1 MiB with a pattern to the ext4 root disk (not tmpfs), fsyncs, drops the page
 * cache when the kernel allows, reads it back and verifies. Exits 0 when the data survived. */
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#define SIZE (1 << 20)
#define PATH "/var/tmp/rrr-disk-rw.bin"

static unsigned char pattern(size_t i)
{
	return (unsigned char)(i * 31 + (i >> 12));
}

int main(void)
{
	static unsigned char buf[SIZE];
	for (size_t i = 0; i < SIZE; i++)
		buf[i] = pattern(i);

	int fd = open(PATH, O_CREAT | O_TRUNC | O_WRONLY, 0644);
	if (fd < 0 || write(fd, buf, SIZE) != SIZE || fsync(fd) < 0) {
		perror("disk_rw: write " PATH);
		return 1;
	}
	close(fd);

	/* Without this the read would come from the page cache and never touch the disk. */
	int drop = open("/proc/sys/vm/drop_caches", O_WRONLY);
	if (drop >= 0) {
		if (write(drop, "3\n", 2) != 2)
			perror("disk_rw: drop_caches");
		close(drop);
	}

	memset(buf, 0, SIZE);
	fd = open(PATH, O_RDONLY);
	ssize_t got = fd < 0 ? -1 : read(fd, buf, SIZE);
	if (got != SIZE) {
		perror("disk_rw: read " PATH);
		return 1;
	}
	close(fd);
	for (size_t i = 0; i < SIZE; i++) {
		if (buf[i] != pattern(i)) {
			printf("disk_rw: mismatch at byte %zu: read %#x, wrote %#x\n", i, buf[i], pattern(i));
			return 1;
		}
	}
	printf("disk_rw: 1 MiB written, synced, read back and verified\n");
	return 0;
}
