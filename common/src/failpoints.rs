//! Fault injection shared by Nexus and the sled agent (the `fail` crate).
//! With the `failpoints` feature off (every build but tests) the points
//! compile to nothing.

use camino::Utf8Path;

/// Fails with EIO if the test configured `NAME=return(FILE_NAME)` and
/// `path`'s last component is FILE_NAME: a read error on one file, which no
/// root-run test could otherwise cause on a healthy disk (permissions do
/// not stop root).
#[cfg_attr(not(feature = "failpoints"), allow(unused_variables))]
pub fn read_error(name: &str, path: &Utf8Path) -> std::io::Result<()> {
    #[cfg(feature = "failpoints")]
    if let Some(Some(file_name)) = fail::eval(name, |argument| argument)
        && path.file_name() == Some(file_name.as_str())
    {
        return Err(std::io::Error::from_raw_os_error(libc::EIO));
    }
    Ok(())
}
