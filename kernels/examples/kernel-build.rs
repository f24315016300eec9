//! Builds a kernel with the library alone (no `rrr` binary needed):
//! `cargo run -p rrr-kernels --example kernel-build -- [--carrier] CACHE_DIR`. Prints the kernel directory.

fn main() {
    let mut args: Vec<String> = std::env::args().skip(1).collect();
    let carrier = args.iter().any(|a| a == "--carrier");
    args.retain(|a| a != "--carrier");
    let Some(cache) = args.first() else {
        eprintln!("usage: kernel-build [--carrier] CACHE_DIR");
        std::process::exit(2);
    };
    let spec = if carrier {
        rrr_kernels::KernelSpec::carrier()
    } else {
        rrr_kernels::KernelSpec::default()
    };
    let started = std::time::Instant::now();
    match rrr_kernels::build(&spec, std::path::Path::new(cache), &|progress| {
        eprintln!("{progress:?}")
    }) {
        Ok(kernel) => {
            eprintln!("done in {:.0?}", started.elapsed());
            println!("{}", kernel.dir.display());
        }
        Err(err) => {
            eprintln!("error: {err}");
            std::process::exit(1);
        }
    }
}
