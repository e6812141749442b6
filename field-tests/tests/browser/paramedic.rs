//! The paramedic page (`cpis-agent run`, plain HTTP on loopback), as a crew uses it: the
//! staff id first, then by keyboard alone a FLAGGED number (plan types in words, council,
//! tap-to-call emergency number, recent contacts), a NOT FLAGGED number (coverage), invalid
//! numbers (the reason, status 400, the typed value kept, nothing recorded), and the STALE
//! banner once the server has been out of reach longer than its freshness policy's fresh age.
//! Every state: axe-core, no horizontal scroll at 1280x800, at 200% zoom and on an 800x1280
//! portrait tablet, and screenshots of all three.

use std::time::{Duration, Instant};

use anyhow::{Context as _, bail, ensure};
use cpis_protocol::FlagRecord;
use fantoccini::key::Key;

use crate::driver::Browser;
use crate::{Freshness, World, digits, spaced, words};

/// The server's freshness policy here: fresh for 15 s, so that stale data can be shown
/// honestly (the server stopped, the tablet's data ageing) within the test's time.
const POLICY: Freshness = Freshness {
    fresh_secs: 15,
    expiry_secs: 7 * 24 * 3600,
};
/// How long the banner may take to turn stale after the server stops.
const STALE_BOUND: Duration = Duration::from_secs(POLICY.fresh_secs + 60);
/// Staff id typed at the start of the shift.
const STAFF_ID: &str = "P123456";

pub(crate) async fn run() -> anyhow::Result<()> {
    let mut world = World::start("paramedic", Some(POLICY)).await?;
    let mut b = Browser::start("paramedic", world.dir.path()).await?;
    let result = flow(&mut world, &mut b).await;
    if result.is_err() {
        eprintln!("[paramedic] agent log:\n{}", world.agent.log_tail(30));
        b.dump_failure().await;
    }
    b.close().await?;
    result
}

async fn flow(world: &mut World, b: &mut Browser) -> anyhow::Result<()> {
    let page = world.agent.base_url().to_owned();
    let (flagged, plans) = world.flagged();
    let nobody = world.not_flagged();

    // Start of shift: the staff id is asked first, and nothing can be looked up yet.
    world.agent.sync().await?;
    b.goto(&page).await?;
    ensure!(
        b.exists("form#staff").await?,
        "no form#staff on a new shift"
    );
    ensure!(
        !b.exists("#nhs-number").await?,
        "the lookup form is shown before the staff id is given"
    );
    check_banner(b, "fresh").await?;
    check_outbox(world, b).await?;
    check_state(b, "staff-id").await?;

    // Keyboard only: Tab to the staff id, type it, Enter.
    // From the top of the page with nothing focused (not only through autofocus).
    b.blur().await?;
    let presses = b.tab_to("staff-id", 20).await?;
    eprintln!("[paramedic] staff id field reached with {presses} Tab presses");
    b.type_text(STAFF_ID).await?;
    b.navigating(|| b.press(&[Key::Enter])).await?;
    if !b.exists("#nhs-number").await? {
        bail!(
            "after the staff id was given ({}, status {}) there is no lookup form; the page \
             says: {}",
            b.url().await?,
            b.status().await?,
            b.alert().await?
        );
    }
    let focused = b.focused_id().await?;
    ensure!(
        focused == "nhs-number",
        "the NHS number field does not have focus when the page opens (`{focused}` has)"
    );
    let text = b.page_text().await?;
    ensure!(
        text.contains(STAFF_ID),
        "the page does not show the staff id {STAFF_ID}:\n{text}"
    );
    ensure!(b.exists("form#end-shift").await?, "no form#end-shift");
    for (attr, want) in [("inputmode", "numeric"), ("autocomplete", "off")] {
        let got = b.attr("#nhs-number", attr).await?;
        ensure!(
            got.as_deref() == Some(want),
            "#nhs-number {attr}={got:?}, expected {want}"
        );
    }
    check_state(b, "lookup-form").await?;

    // FLAGGED, by keyboard alone: Tab to the field, type with spaces, Enter.
    world.agent.sync().await?;
    b.blur().await?;
    let presses = b.tab_to("nhs-number", 30).await?;
    eprintln!("[paramedic] NHS number field reached with {presses} Tab presses");
    b.type_text(&spaced(&flagged)).await?;
    b.navigating(|| b.press(&[Key::Enter])).await?;
    check_flagged(world, b, &plans).await?;
    ensure!(
        !digits(&b.url().await?).contains(&flagged.to_string()),
        "the NHS number appears in the URL {}",
        b.url().await?
    );
    check_state(b, "flagged").await?;

    // NOT FLAGGED, typed with hyphens, by clicking Check.
    world.agent.sync().await?;
    let s = nobody.to_string();
    let hyphens = format!("{}-{}-{}", &s[..3], &s[3..6], &s[6..]);
    lookup_by_click(b, &hyphens).await?;
    expect_result(b, "not_flagged").await?;
    let result = words(&b.text("section#result").await?);
    ensure!(result.contains("not flagged"), "no NOT FLAGGED: {result}");
    for code in &world.carried {
        let name = world.council_name(code);
        ensure!(
            result.contains(&words(name)),
            "coverage does not name {name} ({code}): {result}"
        );
    }
    check_banner(b, "fresh").await?;
    check_state(b, "not-flagged").await?;

    // Invalid: a wrong check digit, then a wrong length. 400, the reason, the value kept,
    // nothing recorded.
    world.agent.sync().await?;
    let mut wrong = flagged.to_string().into_bytes();
    wrong[9] = b'0' + (wrong[9] - b'0' + 1) % 10;
    let wrong = String::from_utf8(wrong)?;
    for (typed, reason, state) in [
        (wrong.as_str(), Some("check digit"), "invalid-check-digit"),
        ("12345", None, "invalid-length"),
    ] {
        lookup_by_click(b, typed).await?;
        expect_result(b, "invalid").await?;
        let status = b.status().await?;
        ensure!(status == 400, "{state}: status {status}, expected 400");
        let alert = b.text("[role=alert]").await.context("no role=alert")?;
        ensure!(!alert.trim().is_empty(), "{state}: the alert is empty");
        if let Some(r) = reason {
            ensure!(
                words(&alert).contains(r),
                "{state}: the alert does not say `{r}`: {alert}"
            );
        }
        eprintln!("[paramedic] {typed:?}: {}", alert.trim());
        let kept = b.find("#nhs-number").await?.prop("value").await?;
        ensure!(
            kept.as_deref() == Some(typed),
            "{state}: the field holds {kept:?}, not what was typed ({typed:?})"
        );
        check_state(b, state).await?;
    }
    let pending = world.agent.status().await?.outbox_pending;
    ensure!(
        pending == 0,
        "invalid numbers left {pending} events to send (nothing must be recorded)"
    );

    // STALE: the server goes away; the tablet's data ages past the fresh age.
    world.server.stop().await?;
    let stopped = Instant::now();
    loop {
        b.goto(&page).await?;
        let f = b.attr("#freshness-banner", "data-freshness").await?;
        if f.as_deref() == Some("stale") {
            break;
        }
        if stopped.elapsed() > STALE_BOUND {
            bail!("the banner still says {f:?} {STALE_BOUND:?} after the server stopped");
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    eprintln!(
        "[paramedic] stale banner {:.1} s after the server stopped",
        stopped.elapsed().as_secs_f64()
    );
    check_banner(b, "stale").await?;
    check_state(b, "stale").await?;

    // A lookup on stale data: the answer, the banner still there, the notice waiting.
    b.tab_to("nhs-number", 30).await?;
    b.type_text(&flagged.to_string()).await?;
    b.navigating(|| b.press(&[Key::Enter])).await?;
    check_flagged(world, b, &plans).await?;
    check_banner(b, "stale").await?;
    let pending = check_outbox(world, b).await?;
    ensure!(
        pending >= 1,
        "the lookup made offline left no notice waiting"
    );
    check_state(b, "stale-flagged").await?;
    Ok(())
}

/// Types a number into the cleared field and clicks Check.
async fn lookup_by_click(b: &Browser, typed: &str) -> anyhow::Result<()> {
    let field = b.find("#nhs-number").await?;
    field.clear().await?;
    field.send_keys(typed).await?;
    b.click_to_page("form#lookup [type=submit]").await
}

async fn expect_result(b: &Browser, want: &str) -> anyhow::Result<()> {
    let got = b.attr("section#result", "data-result").await?;
    ensure!(
        got.as_deref() == Some(want),
        "section#result data-result={got:?}, expected {want}"
    );
    Ok(())
}

/// FLAGGED with every plan in words, each council's name and tap-to-call emergency number,
/// and the recent contacts.
async fn check_flagged(world: &World, b: &Browser, plans: &[FlagRecord]) -> anyhow::Result<()> {
    expect_result(b, "flagged").await?;
    let result = b.text("section#result").await?;
    ensure!(result.contains("FLAGGED"), "no FLAGGED heading: {result}");
    let w = words(&result);
    let tels: Vec<String> = {
        let mut v = Vec::new();
        for a in b.find_all("section#result a.tel").await? {
            v.push(a.attr("href").await?.unwrap_or_default());
        }
        v
    };
    for f in plans {
        let plan = words(f.plan_type.description());
        ensure!(w.contains(&plan), "plan type `{plan}` not shown: {result}");
        let name = world.council_name(&f.council);
        ensure!(
            w.contains(&words(name)),
            "council {name} not shown: {result}"
        );
        let council = world
            .directory
            .councils
            .iter()
            .find(|c| c.code == f.council)
            .context("council not in the directory")?;
        let want = tel(&council.emergency_phone);
        ensure!(
            tels.iter().any(|t| t.replace(' ', "") == want),
            "no a.tel with href {want} for {name}'s emergency number {} (links: {tels:?})",
            council.emergency_phone
        );
    }
    ensure!(
        b.exists("#recent-contacts").await?,
        "no #recent-contacts in the flagged result"
    );
    Ok(())
}

/// `tel:+44…` for a UK number written `0300 123 4567`.
fn tel(phone: &str) -> String {
    let d = digits(phone);
    match d.strip_prefix('0') {
        Some(rest) => format!("tel:+44{rest}"),
        None => format!("tel:+{d}"),
    }
}

/// The freshness banner says `want`, in words as well as in its attribute.
async fn check_banner(b: &Browser, want: &str) -> anyhow::Result<()> {
    let got = b.attr("#freshness-banner", "data-freshness").await?;
    ensure!(
        got.as_deref() == Some(want),
        "#freshness-banner data-freshness={got:?}, expected {want}"
    );
    let banner = b.find("#freshness-banner").await?;
    ensure!(banner.is_displayed().await?, "#freshness-banner is hidden");
    let text = banner.text().await?;
    if want != "fresh" {
        ensure!(
            text.to_lowercase().contains(want),
            "the {want} banner does not say so in words: {text}"
        );
    }
    eprintln!("[paramedic] banner ({want}): {}", text.trim());
    Ok(())
}

/// `#outbox-pending` shows the agent's own count of notices waiting; returns it.
async fn check_outbox(world: &World, b: &Browser) -> anyhow::Result<u64> {
    let pending = world.agent.status().await?.outbox_pending;
    let text = b.text("#outbox-pending").await?;
    ensure!(
        digits(&text).contains(&pending.to_string()) || (pending == 0 && text.contains("No")),
        "#outbox-pending says `{text}`, the agent has {pending} waiting"
    );
    Ok(pending)
}

/// axe-core at 1280x800, a screenshot, and no horizontal scroll at 1280x800, 200% zoom or
/// 800x1280 portrait (each photographed).
async fn check_state(b: &mut Browser, state: &str) -> anyhow::Result<()> {
    b.audit(state).await?;
    b.screenshot(state).await?;
    for l in b.layouts(state).await? {
        ensure!(
            l.scroll_width <= l.client_width,
            "{state} at {}: horizontal scroll (scrollWidth {} > clientWidth {}); see {}",
            l.label,
            l.scroll_width,
            l.client_width,
            l.screenshot.display()
        );
    }
    Ok(())
}
