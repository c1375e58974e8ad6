//! How the command-line tools report an error to a person: the message and
//! its causes, one per line, and never a backtrace. (anyhow captures a
//! backtrace whenever `RUST_BACKTRACE` is set, and returning the error from
//! `main` prints it with `{:?}`, frames and all.)

use std::process::ExitCode;

pub fn report(error: &anyhow::Error) -> String {
    let mut out = format!("error: {error}");
    for cause in error.chain().skip(1) {
        out += &format!("\n  caused by: {cause}");
    }
    out
}

/// The exit of a tool's `main`: success, or the error reported on stderr.
pub fn exit(result: anyhow::Result<()>) -> ExitCode {
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("{}", report(&error));
            ExitCode::FAILURE
        }
    }
}

/// `count` and the noun, in the singular for one: "1 sled", "2 sleds".
pub fn count_of(count: usize, noun: &str) -> String {
    if count == 1 { format!("1 {noun}") } else { format!("{count} {noun}s") }
}

#[cfg(test)]
mod tests {
    use super::*;
    use anyhow::Context;

    #[test]
    fn causes_follow_the_message_one_per_line() {
        let error = Err::<(), _>(std::io::Error::other("disk on fire"))
            .context("reading the config")
            .context("starting")
            .unwrap_err();
        assert_eq!(
            report(&error),
            "error: starting\n  caused by: reading the config\n  caused by: disk on fire"
        );
    }
}
