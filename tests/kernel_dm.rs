//! Kernel tests: need device-mapper. Run with scripts/vm-test.
use thinimg::dm::Dm;

fn need_dm() {
    if !std::path::Path::new("/dev/mapper/control").exists() {
        panic!("needs device-mapper (/dev/mapper/control is missing): run scripts/vm-test");
    }
}

#[test]
fn version_and_list() {
    need_dm();
    let dm = Dm::open().unwrap();
    let v = dm.version().unwrap();
    assert_eq!(v[0], 4);
    dm.list().unwrap();
}
