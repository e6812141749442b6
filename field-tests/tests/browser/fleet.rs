//! The trust fleet page on the sync server: a trust admin token (made with
//! `cpis-sync-server admin trust token`) signs in; the enrolled tablet is in
//! `table#devices`; Revoke leads to a confirmation page saying what revoking does; confirming
//! moves the tablet from `table#devices` to `table#revoked`, and the tablet, at its next
//! contact, is refused. axe-core and a screenshot at every step.

use anyhow::{Context as _, ensure};

use crate::World;
use crate::driver::Browser;

pub(crate) async fn run() -> anyhow::Result<()> {
    let world = World::start("fleet", None).await?;
    let mut b = Browser::start("fleet", world.dir.path()).await?;
    let result = flow(&world, &mut b).await;
    if result.is_err() {
        eprintln!("[fleet] server log:\n{}", world.server.log_tail(30));
        b.dump_failure().await;
    }
    b.close().await?;
    result
}

async fn flow(world: &World, b: &mut Browser) -> anyhow::Result<()> {
    let device = world.agent.status().await?.device.to_string();
    let out = world
        .server
        .admin(&["trust", "token", "--trust", world.trust.as_str()])
        .await?;
    let token = out
        .split_whitespace()
        .find(|w| w.starts_with("cpis_at_"))
        .with_context(|| format!("no cpis_at_ token in `admin trust token` output: {out}"))?
        .to_owned();
    let base = world.server.base_url();

    b.goto(&format!("{base}/fleet")).await?;
    ensure!(b.exists("form#sign-in").await?, "no form#sign-in");
    b.audit("sign-in").await?;
    b.screenshot("sign-in").await?;
    b.find("#token").await?.send_keys(&token).await?;
    b.click_to_page("form#sign-in [type=submit]").await?;
    let url = b.url().await?;
    ensure!(
        url.contains("/fleet/devices"),
        "signing in led to {url}, not the device list; the page says: {}",
        b.alert().await?
    );
    let row = format!("table#devices tr[data-device-id=\"{device}\"]");
    let text = b
        .text(&row)
        .await
        .with_context(|| format!("tablet {device} is not in table#devices"))?;
    eprintln!("[fleet] device row: {}", text.replace('\n', " | "));
    b.audit("devices").await?;
    b.screenshot("devices").await?;
    // The page itself never scrolls sideways (a wide table scrolls inside its own box).
    for l in b.layouts("devices").await? {
        eprintln!(
            "[fleet] devices at {}: scrollWidth {}, clientWidth {}",
            l.label, l.scroll_width, l.client_width
        );
        ensure!(
            l.scroll_width <= l.client_width,
            "devices at {}: horizontal scroll (scrollWidth {} > clientWidth {}); see {}",
            l.label,
            l.scroll_width,
            l.client_width,
            l.screenshot.display()
        );
    }

    // Revoke: a confirmation page first.
    b.click_to_page(&format!("{row} a.revoke")).await?;
    ensure!(
        b.exists("form#confirm-revoke").await?,
        "Revoke did not lead to form#confirm-revoke ({})",
        b.url().await?
    );
    let text = b.page_text().await?;
    ensure!(
        text.to_lowercase().contains("data"),
        "the confirmation page does not say what revoking does to the tablet's data: {text}"
    );
    b.audit("confirm-revoke").await?;
    b.screenshot("confirm-revoke").await?;
    b.click_to_page("#confirm").await?;
    let url = b.url().await?;
    ensure!(
        url.contains("/fleet/devices"),
        "confirming led to {url}, not the device list; the page says: {}",
        b.alert().await?
    );
    ensure!(
        !b.exists(&row).await?,
        "the revoked tablet is still in table#devices"
    );
    ensure!(
        b.exists(&format!("table#revoked tr[data-device-id=\"{device}\"]"))
            .await?,
        "the revoked tablet is not in table#revoked"
    );
    b.audit("revoked").await?;
    b.screenshot("revoked").await?;

    // The tablet learns it at its next contact.
    let refused = match world.agent.sync().await {
        Ok(r) => anyhow::bail!("the revoked tablet synced: {r:?}"),
        Err(e) => format!("{e:#}"),
    };
    ensure!(
        refused.contains("revoked"),
        "the tablet's sync after revoking failed for another reason: {refused}"
    );
    eprintln!("[fleet] the tablet's next sync: {refused}");
    Ok(())
}
