//! Builds the index of an ELF file and reports what is in it and how long it took:
//! `cargo run --release -p rrr-tracer --example index -- VMLINUX [FUNCTION...]`.

use std::time::Instant;

use rrr_tracer::{BuildOptions, Index};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let path = args.next().ok_or("usage: index ELF [FUNCTION...]")?;
    let threads = std::env::var("RRR_INDEX_THREADS")
        .ok()
        .and_then(|t| t.parse().ok())
        .unwrap_or_else(|| BuildOptions::default().threads);

    let t = Instant::now();
    let index = Index::build_with(path.as_ref(), BuildOptions { threads })?;
    let build = t.elapsed();
    let t = Instant::now();
    let bytes = index.to_bytes();
    let ser = t.elapsed();
    let t = Instant::now();
    let back = Index::from_bytes(&bytes)?;
    let load = t.elapsed();
    assert_eq!(back.functions.len(), index.functions.len());

    let traceable = index
        .functions
        .iter()
        .filter(|f| f.fentry.is_some())
        .count();
    let params: usize = index.functions.iter().map(|f| f.params.len()).sum();
    let located = index
        .functions
        .iter()
        .flat_map(|f| &f.params)
        .filter(|p| {
            matches!(
                p.location,
                rrr_tracer::Location::Reg(_)
                    | rrr_tracer::Location::Abi(_)
                    | rrr_tracer::Location::Stack(_)
                    | rrr_tracer::Location::RegPair(..)
                    | rrr_tracer::Location::Const(_)
            )
        })
        .count();
    let mut by_kind = std::collections::BTreeMap::<&str, usize>::new();
    for p in index.functions.iter().flat_map(|f| &f.params) {
        let k = match p.location {
            rrr_tracer::Location::Reg(_) => "dwarf-reg",
            rrr_tracer::Location::Stack(_) => "stack",
            rrr_tracer::Location::RegPair(..) => "dwarf-reg-pair",
            rrr_tracer::Location::Const(_) => "const",
            rrr_tracer::Location::Abi(_) => "abi-reg",
            rrr_tracer::Location::Expr(_) => "expr",
            rrr_tracer::Location::Unavailable => "unavailable",
        };
        *by_kind.entry(k).or_default() += 1;
    }
    println!("file            {path}");
    println!("threads         {threads}");
    println!("build           {:.2} s", build.as_secs_f64());
    println!("cache size      {:.1} MB", bytes.len() as f64 / 1e6);
    println!("serialize       {:.2} s", ser.as_secs_f64());
    println!("load            {:.2} s", load.as_secs_f64());
    println!(
        "units           {} ({} unreadable)",
        index.units.len(),
        index.bad_units
    );
    println!("functions       {}", index.functions.len());
    println!(
        "fentry sites    {} ({traceable} functions)",
        index.fentry_sites.len()
    );
    println!("parameters      {params} ({located} readable at entry)");
    println!("locations       {by_kind:?}");
    println!("inlined         {}", index.inlined.len());
    println!("types           {}", index.types.len());
    println!("struct layouts  {}", index.layouts.len());
    println!("symbols         {}", index.symbols.len());
    println!("current task    {:?}", index.current_task);
    if let Ok(t) = index.task_layout() {
        println!("task_struct     {t:?}");
    }
    println!("return sites    {}", index.return_sites.len());
    println!("syscalls        {}", index.syscalls.len());
    for name in args {
        if let Some(params) = index.syscalls.get(&name) {
            let shown: Vec<String> = params
                .iter()
                .map(|p| {
                    format!(
                        "{} {}",
                        index.type_name(p.ty),
                        p.name.as_deref().unwrap_or("?")
                    )
                })
                .collect();
            println!("syscall {name}({})", shown.join(", "));
        }
        for f in index.functions_named(&name) {
            println!(
                "{} @ {:#x} fentry {:?} unit {}",
                f.name, f.entry, f.fentry, index.units[f.unit as usize]
            );
            for p in &f.params {
                println!(
                    "    {} {}: {:?} {:?}",
                    index.type_name(p.ty),
                    p.name.as_deref().unwrap_or("?"),
                    index.value_kind(p.ty),
                    p.location
                );
            }
        }
    }
    Ok(())
}
