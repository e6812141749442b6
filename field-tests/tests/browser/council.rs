//! The council inbox on the sync server (HTTPS with the server's private CA): a wrong token
//! is refused in words with 401; the council's token signs in; the notice the tablet's
//! lookup produced (once the tablet has synced) is in `table#notices` with the NHS number;
//! ticking it and acknowledging removes it, from the page and from the council's mailbox
//! API alike. axe-core and a screenshot at every step.

use anyhow::{Context as _, ensure};

use crate::driver::Browser;
use crate::{World, digits};

pub(crate) async fn run() -> anyhow::Result<()> {
    let world = World::start("council", None).await?;
    let mut b = Browser::start("council", world.dir.path()).await?;
    let result = flow(&world, &mut b).await;
    if result.is_err() {
        eprintln!("[council] server log:\n{}", world.server.log_tail(30));
        b.dump_failure().await;
    }
    b.close().await?;
    result
}

async fn flow(world: &World, b: &mut Browser) -> anyhow::Result<()> {
    // A crew looks up a flagged child; the tablet syncs and the notice reaches the council.
    let (flagged, _) = world.flagged();
    let answer = world.agent.lookup(&flagged.to_string()).await?;
    ensure!(
        !answer.flags.is_empty(),
        "{flagged} was not flagged: {answer:?}"
    );
    let council = answer.flags[0].council.ods.clone();
    let sent = world.agent.sync().await?.events_sent;
    ensure!(sent >= 1, "the sync sent no events");
    let api = world.server.council(&council).await?;
    let event = answer.event_id.to_string();
    ensure!(
        api.notifications()
            .await?
            .iter()
            .any(|n| n.event_id == answer.event_id),
        "the council's mailbox API does not hold event {event}"
    );
    let token = world.server.council_token(&council).await?;
    let base = world.server.base_url();

    // Sign-in page; a wrong token is refused in words.
    b.goto(&format!("{base}/council")).await?;
    ensure!(b.exists("form#sign-in").await?, "no form#sign-in");
    let ty = b.attr("#token", "type").await?;
    ensure!(ty.as_deref() == Some("password"), "#token type={ty:?}");
    b.audit("sign-in").await?;
    b.screenshot("sign-in").await?;
    b.find("#token")
        .await?
        .send_keys("cpis_ct_not_a_token")
        .await?;
    b.click_to_page("form#sign-in [type=submit]").await?;
    let status = b.status().await?;
    ensure!(
        status == 401,
        "a wrong token got status {status}, expected 401; the page says: {}",
        b.alert().await?
    );
    let text = b.page_text().await?;
    ensure!(
        text.contains("That token was not accepted"),
        "a wrong token's page does not say so: {text}"
    );
    ensure!(
        b.exists("[role=alert]").await?,
        "no role=alert for the error"
    );
    b.audit("wrong-token").await?;
    b.screenshot("wrong-token").await?;

    // The council's token: the inbox, with the notice.
    b.find("#token").await?.clear().await?;
    b.find("#token").await?.send_keys(&token).await?;
    b.click_to_page("form#sign-in [type=submit]").await?;
    let url = b.url().await?;
    ensure!(
        url.contains("/council/inbox"),
        "signing in led to {url}, not the inbox; the page says: {}",
        b.alert().await?
    );
    let row = format!("table#notices tr[data-event-id=\"{event}\"]");
    let text = b
        .text(&row)
        .await
        .with_context(|| format!("the notice for event {event} is not in the inbox"))?;
    ensure!(
        digits(&text).contains(&flagged.to_string()),
        "the notice's row does not show NHS number {flagged}: {text}"
    );
    eprintln!("[council] notice row: {}", text.replace('\n', " | "));
    for id in ["filter", "ack"] {
        ensure!(b.exists(&format!("form#{id}")).await?, "no form#{id}");
    }
    ensure!(b.exists("a#export").await?, "no a#export");
    b.audit("inbox").await?;
    b.screenshot("inbox").await?;
    // The page itself never scrolls sideways (a wide table scrolls inside its own box).
    for l in b.layouts("inbox").await? {
        eprintln!(
            "[council] inbox at {}: scrollWidth {}, clientWidth {}",
            l.label, l.scroll_width, l.client_width
        );
        ensure!(
            l.scroll_width <= l.client_width,
            "inbox at {}: horizontal scroll (scrollWidth {} > clientWidth {}); see {}",
            l.label,
            l.scroll_width,
            l.client_width,
            l.screenshot.display()
        );
    }

    // Acknowledge it: gone from the page and from the mailbox.
    b.find(&format!("{row} input[type=checkbox][name=event_id]"))
        .await?
        .click()
        .await?;
    b.screenshot("inbox-ticked").await?;
    b.click_to_page("#ack-selected").await?;
    ensure!(
        !b.exists(&row).await?,
        "the acknowledged notice is still in the inbox"
    );
    let left = b.find_all("table#notices tr[data-event-id]").await?.len();
    if left == 0 {
        ensure!(b.exists("#empty").await?, "an empty inbox without #empty");
        eprintln!("[council] inbox empty: {}", b.text("#empty").await?.trim());
    }
    ensure!(
        !api.notifications()
            .await?
            .iter()
            .any(|n| n.event_id == answer.event_id),
        "the council's mailbox API still holds event {event} after the page acknowledged it"
    );
    b.audit("inbox-acknowledged").await?;
    b.screenshot("inbox-acknowledged").await?;
    Ok(())
}
