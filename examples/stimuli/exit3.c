/* exit3.c: exits with status 3, to check that exit statuses travel from guest to host. */
int main(void)
{
	return 3;
}
