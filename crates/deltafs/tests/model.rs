//! Property test: random operation sequences, including checkpoints, rollbacks and remounts of
//! earlier checkpoints (branches), on a real mount against an in-memory model.
mod common;

use std::collections::BTreeMap;
use std::os::unix::fs::FileExt;
use std::path::Path;

use common::*;
use deltafs::{mount, Mount, MountOptions, StackId};
use proptest::prelude::*;

const NAMES: [&str; 6] = ["a", "b", "c", "sub/a", "sub/b", "sub/deeper/c"];

#[derive(Debug, Clone)]
enum Op {
    Write {
        file: usize,
        offset: u64,
        len: usize,
        byte: u8,
    },
    Truncate {
        file: usize,
        size: u64,
    },
    Unlink {
        file: usize,
    },
    Rename {
        from: usize,
        to: usize,
    },
    Checkpoint,
    Rollback {
        to: usize,
    },
    Branch {
        from: usize,
    },
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        4 => (0..NAMES.len(), 0u64..700_000, 1usize..70_000, any::<u8>())
            .prop_map(|(file, offset, len, byte)| Op::Write { file, offset, len, byte }),
        1 => (0..NAMES.len(), 0u64..800_000).prop_map(|(file, size)| Op::Truncate { file, size }),
        1 => (0..NAMES.len()).prop_map(|file| Op::Unlink { file }),
        1 => (0..NAMES.len(), 0..NAMES.len()).prop_map(|(from, to)| Op::Rename { from, to }),
        2 => Just(Op::Checkpoint),
        1 => (0usize..8).prop_map(|to| Op::Rollback { to }),
        1 => (0usize..8).prop_map(|from| Op::Branch { from }),
    ]
}

type Model = BTreeMap<&'static str, Vec<u8>>;

fn check(root: &Path, model: &Model) {
    for name in NAMES {
        let got = std::fs::read(root.join(name)).ok();
        assert_eq!(
            got.as_ref().map(Vec::len),
            model.get(name).map(Vec::len),
            "size of {name}"
        );
        assert!(got.as_ref() == model.get(name), "content of {name}");
    }
}

fn run(ops: Vec<Op>) {
    let fx = Fixture::new();
    let base = fx.base(|d| {
        std::fs::create_dir_all(d.join("sub/deeper")).unwrap();
        std::fs::write(d.join("a"), vec![1u8; 300_000]).unwrap();
        std::fs::write(d.join("sub/b"), b"image file").unwrap();
    });
    let mut model: Model = BTreeMap::new();
    model.insert("a", vec![1u8; 300_000]);
    model.insert("sub/b", b"image file".to_vec());
    let mut checkpoints: Vec<(StackId, Model)> = vec![(base, model.clone())];
    let mut generation = 0;
    let mut m: Mount = fx.mount(base, "g0");
    for op in ops {
        let root = m.mountpoint().to_owned();
        match op {
            Op::Write {
                file,
                offset,
                len,
                byte,
            } => {
                let f = std::fs::OpenOptions::new()
                    .create(true)
                    .truncate(false)
                    .write(true)
                    .open(root.join(NAMES[file]))
                    .unwrap();
                f.write_all_at(&vec![byte; len], offset).unwrap();
                let data = model.entry(NAMES[file]).or_default();
                let end = offset as usize + len;
                if data.len() < end {
                    data.resize(end, 0);
                }
                data[offset as usize..end].fill(byte);
            }
            Op::Truncate { file, size } => {
                if let Some(data) = model.get_mut(NAMES[file]) {
                    let f = std::fs::OpenOptions::new()
                        .write(true)
                        .open(root.join(NAMES[file]))
                        .unwrap();
                    f.set_len(size).unwrap();
                    data.resize(size as usize, 0);
                }
            }
            Op::Unlink { file } => {
                if model.remove(NAMES[file]).is_some() {
                    std::fs::remove_file(root.join(NAMES[file])).unwrap();
                }
            }
            Op::Rename { from, to } => {
                if let Some(data) = model.remove(NAMES[from]) {
                    std::fs::rename(root.join(NAMES[from]), root.join(NAMES[to])).unwrap();
                    model.insert(NAMES[to], data);
                }
            }
            Op::Checkpoint => checkpoints.push((m.checkpoint().unwrap(), model.clone())),
            Op::Rollback { to } => {
                let (cp, state) = checkpoints[to % checkpoints.len()].clone();
                m.rollback(cp).unwrap();
                model = state;
            }
            Op::Branch { from } => {
                let (cp, state) = checkpoints[from % checkpoints.len()].clone();
                generation += 1;
                let next = mount(
                    &fx.store,
                    cp,
                    &fx.mountpoint(&format!("g{generation}")),
                    &MountOptions::default(),
                )
                .unwrap();
                m.unmount().unwrap();
                m = next;
                model = state;
            }
        }
        check(m.mountpoint(), &model);
    }
    m.unmount().unwrap();
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 40, failure_persistence: None, ..ProptestConfig::default() })]
    #[test]
    fn random_operations_match_the_model(ops in proptest::collection::vec(op(), 1..40)) {
        if fuse_available() {
            run(ops);
        }
    }
}
