/* A user program for the index tests: functions with typed parameters, structs with nested and
 * anonymous members, an enum, a flags enum and an inlined helper. Run, it prints its own
 * layouts (offsetof/sizeof) so the test compares the index with the compiler's own numbers. */
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

enum color { RED, GREEN = 5, BLUE = -2 };
enum mode { M_READ = 1, M_WRITE = 2, M_EXEC = 4 };

struct inner {
	long a;
	char tag[7];
};

struct outer {
	int id;
	struct inner in;
	union {
		unsigned long word;
		struct {
			unsigned short lo;
			unsigned short hi;
		};
	};
	const char *name;
	struct outer *next;
	unsigned flag : 3;
};

typedef unsigned long my_size_t;

static inline __attribute__((always_inline)) long twice(long v)
{
	return v * 2;
}

__attribute__((noinline)) long probe_fn(int a, const char *s, struct outer *o,
					 enum color c, my_size_t n, _Bool b,
					 enum mode m, void *opaque)
{
	long r = twice(a) + (long)strlen(s) + o->id + c + (long)n + b + m;
	if (opaque)
		r += *(volatile char *)opaque;
	return r;
}

__attribute__((noinline)) void many_args(long a1, long a2, long a3, long a4, long a5, long a6,
					 long a7, long a8)
{
	printf("%ld\n", a1 + a2 + a3 + a4 + a5 + a6 + a7 + a8);
}

__attribute__((cold, noinline)) void rare(const char *m)
{
	fprintf(stderr, "%s\n", m);
}

/* The unlikely branch goes to a separate `split_fn.cold` part: a function with two ranges. */
__attribute__((noinline)) long split_fn(long x)
{
	if (__builtin_expect(x == 12345, 0)) {
		rare("a");
		rare("b");
		abort();
	}
	return x + 1;
}

int main(int argc, char **argv)
{
	struct outer o = { .id = 3, .name = "x" };
	printf("outer.id %zu\n", offsetof(struct outer, id));
	printf("outer.in %zu\n", offsetof(struct outer, in));
	printf("outer.in.tag %zu\n", offsetof(struct outer, in.tag));
	printf("outer.word %zu\n", offsetof(struct outer, word));
	printf("outer.hi %zu\n", offsetof(struct outer, hi));
	printf("outer.name %zu\n", offsetof(struct outer, name));
	printf("outer.next %zu\n", offsetof(struct outer, next));
	printf("sizeof.outer %zu\n", sizeof(struct outer));
	printf("sizeof.inner %zu\n", sizeof(struct inner));
	if (argc > 5) {
		many_args(1, 2, 3, 4, 5, 6, 7, 8);
		split_fn(argc);
		return (int)probe_fn(argc, argv[0], &o, BLUE, 4, 1, M_READ, argv);
	}
	return 0;
}
