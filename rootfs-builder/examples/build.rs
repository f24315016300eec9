//! Build a rootfs image without the `rrr` binary: `cargo run -p rrr-rootfs --example build --
//! STIMULUS.c CACHE_DIR`. Prints the image path.

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [stimulus, cache] = args.as_slice() else {
        eprintln!("usage: build STIMULUS.c CACHE_DIR");
        std::process::exit(2);
    };
    match rrr_rootfs::build(&rrr_rootfs::RootfsSpec::new(stimulus), cache.as_ref()) {
        Ok(image) => println!("{}", image.path.display()),
        Err(err) => {
            eprintln!("error: {err}");
            std::process::exit(1);
        }
    }
}
