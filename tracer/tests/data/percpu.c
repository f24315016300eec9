/* An SMP kernel keeps `current_task` in the per-CPU section: the index must say so (linked
 * with --unique=.data..percpu so the section stays its own). */
struct task_struct {
	int pid;
};

__attribute__((section(".data..percpu"), used)) struct task_struct *current_task;

int main(void)
{
	return current_task != 0;
}
