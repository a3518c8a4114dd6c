//! Inspects DeltaCR checkpoint images.
//!
//! Usage: `deltacr-image STORE [ID] [--verify]` — lists the images of a store, or describes one image
//! (its parent chain, processes, mappings, fds and page counts); `--verify` also reads every page run
//! of the image and its parents and checks their checksums.

use std::path::Path;
use std::process::ExitCode;

use deltacr::image::{ImageId, ImageStore};

fn print_error(e: &dyn std::error::Error) {
    eprintln!("error: {e}");
    let mut src = e.source();
    while let Some(s) = src {
        eprintln!("  caused by: {s}");
        src = s.source();
    }
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let verify = args.iter().any(|a| a == "--verify");
    let positional: Vec<&String> = args.iter().filter(|a| !a.starts_with("--")).collect();
    let Some(store_path) = positional.first() else {
        eprintln!("usage: deltacr-image STORE [ID] [--verify]");
        return ExitCode::from(2);
    };
    let store = match ImageStore::new(Path::new(store_path.as_str())) {
        Ok(s) => s,
        Err(e) => {
            print_error(&e);
            return ExitCode::FAILURE;
        }
    };
    let Some(id) = positional.get(1) else {
        let mut ids: Vec<String> = std::fs::read_dir(store_path.as_str())
            .map(|rd| rd.filter_map(|e| e.ok()?.file_name().into_string().ok()).collect())
            .unwrap_or_default();
        ids.retain(|n| ImageId::parse(n).is_some());
        ids.sort();
        for n in ids {
            println!("{n}");
        }
        return ExitCode::SUCCESS;
    };
    let Some(id) = ImageId::parse(id) else {
        eprintln!("error: {id} is not an image id (32 hex digits)");
        return ExitCode::from(2);
    };
    let chain = match store.open_chain(id) {
        Ok(c) => c,
        Err(e) => {
            print_error(&e);
            return ExitCode::FAILURE;
        }
    };
    print!("{}", chain.head().describe());
    println!("  chain length: {}", chain.len());
    if verify {
        for img in chain.images() {
            if let Err(e) = img.verify_pages() {
                print_error(&e);
                return ExitCode::FAILURE;
            }
        }
        println!("  all page checksums verified");
    }
    ExitCode::SUCCESS
}
