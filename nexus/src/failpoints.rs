//! Named crash and delay points for tests, with the `fail` crate. They exist
//! only when the `failpoints` feature is on (test builds); elsewhere they
//! compile to nothing.
//!
//! - Crash points use `fail::fail_point!(NAME, |_| std::process::abort())`:
//!   configured as `NAME=return`, the process dies there as in a power cut
//!   of the process (no destructors, no cleanup).
//! - Delay points ([`delay`]) are configured as `NAME=return(WHO:MILLIS)`,
//!   where WHO is a Nexus id or `*`. Several Nexus instances may share a
//!   test process; the id lets a test make exactly one of them slow.
//!
//! The `nexus` binary reads `FAILPOINTS` (`NAME=ACTION;...`) at start-up.

use uuid::Uuid;

/// Waits here if the test configured a delay for this Nexus.
#[cfg_attr(not(feature = "failpoints"), allow(unused_variables))]
pub async fn delay(name: &str, nexus_id: Uuid) {
    #[cfg(feature = "failpoints")]
    {
        let configured = fail::eval(name, |argument| argument).flatten();
        let Some((who, millis)) = configured.as_deref().and_then(|argument| argument.split_once(':')) else {
            return;
        };
        if (who == "*" || who == nexus_id.to_string())
            && let Ok(millis) = millis.parse()
        {
            tokio::time::sleep(std::time::Duration::from_millis(millis)).await;
        }
    }
}
