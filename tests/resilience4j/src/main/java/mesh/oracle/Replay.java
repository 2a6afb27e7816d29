package mesh.oracle;

import io.github.resilience4j.circuitbreaker.CircuitBreaker;
import io.github.resilience4j.circuitbreaker.CircuitBreakerConfig;
import io.github.resilience4j.circuitbreaker.CircuitBreakerConfig.SlidingWindowType;
import java.io.BufferedReader;
import java.io.IOException;
import java.io.PrintWriter;
import java.nio.file.Files;
import java.nio.file.Path;
import java.time.Clock;
import java.time.Duration;
import java.time.Instant;
import java.time.ZoneId;
import java.time.ZoneOffset;
import java.util.HashMap;
import java.util.Map;
import java.util.concurrent.TimeUnit;

/**
 * Replays circuit-breaker traces through Resilience4j's CircuitBreaker with a
 * clock the trace sets, and prints, per event, the admission decision and the
 * state after it. Many traces per run: the JVM starts once.
 *
 * <pre>
 * trace SEED
 * config count|time SIZE MINIMUM FAILURE_RATE SLOW_MS SLOW_RATE OPEN_FOR_MS HALF_OPEN_CALLS MAX_WAIT_MS
 * a T ID                 a request at T (ns since the epoch)
 * f T ID s|f|i DURATION  call ID finished at T: success, failure, ignored; DURATION in ns
 * end
 * </pre>
 *
 * Answers (to ANSWER_FILE) per trace: "trace SEED", one line per event ("a 1 C" admitted /
 * "a 0 O" rejected, "f C"; the letter is the state after the event: C, O, H),
 * then "end". SLOW_MS 0: no slow-call rule. A finish of a call that was not
 * admitted is skipped (printed like any other finish).
 *
 * Two things the harness does for Resilience4j, as our filter does them:
 * - the half-open wait (MAX_WAIT_MS) is Resilience4j's
 *   maxWaitDurationInHalfOpenState, whose timer runs on a real-time scheduler
 *   the clock does not drive; so the harness fires it itself, at exactly the
 *   instant the timer would (the clock set to that instant), before the first
 *   event at or after it;
 * - a call whose outcome arrives after the breaker changed state since it was
 *   admitted is not reported (mesh-filters counts a call only in the state it
 *   was let through in; Resilience4j would count a late closed-state call as a
 *   half-open probe). That difference is documented in docs/circuit-breaker.md.
 */
public final class Replay {

    /** An ignored outcome (Resilience4j's ignoreExceptions). */
    static final class Ignored extends RuntimeException {
        Ignored() {
            super("ignored", null, false, false);
        }
    }

    /** A recorded failure. */
    static final class Failed extends RuntimeException {
        Failed() {
            super("failed", null, false, false);
        }
    }

    /** A clock the trace moves. */
    static final class TraceClock extends Clock {
        long nanos;

        @Override
        public ZoneId getZone() {
            return ZoneOffset.UTC;
        }

        @Override
        public Clock withZone(ZoneId zone) {
            return this;
        }

        @Override
        public Instant instant() {
            return Instant.ofEpochSecond(0, nanos);
        }

        @Override
        public long millis() {
            return Math.floorDiv(nanos, 1_000_000L);
        }
    }

    static final class BadTrace extends Exception {
        BadTrace(int line, String message) {
            super("line " + line + ": " + message);
        }
    }

    public static void main(String[] args) throws IOException {
        if (args.length != 2) {
            System.err.println("usage: Replay TRACE_FILE ANSWER_FILE");
            System.exit(2);
        }
        // The answers go to a file: Maven may decorate its own stdout.
        try (BufferedReader in = Files.newBufferedReader(Path.of(args[0]));
             PrintWriter out = new PrintWriter(Files.newBufferedWriter(Path.of(args[1])))) {
            new Replay(in, out).run();
        } catch (BadTrace e) {
            System.err.println("resilience4j replay: " + e.getMessage());
            System.exit(1);
        }
    }

    private final BufferedReader in;
    private final PrintWriter out;
    private int lineNo;

    private Replay(BufferedReader in, PrintWriter out) {
        this.in = in;
        this.out = out;
    }

    private String[] next() throws IOException, BadTrace {
        String line = in.readLine();
        lineNo++;
        if (line == null) {
            return null;
        }
        return line.trim().split(" ");
    }

    private long num(String[] f, int i) throws BadTrace {
        if (i >= f.length) {
            throw new BadTrace(lineNo, "expected " + (i + 1) + " fields, got " + f.length);
        }
        try {
            return Long.parseLong(f[i]);
        } catch (NumberFormatException e) {
            throw new BadTrace(lineNo, "expected a number, got \"" + f[i] + "\"");
        }
    }

    private int small(String[] f, int i) throws BadTrace {
        long n = num(f, i);
        if (n < 0 || n > Integer.MAX_VALUE) {
            throw new BadTrace(lineNo, "out of range: " + n);
        }
        return (int) n;
    }

    private void run() throws IOException, BadTrace {
        String[] f;
        while ((f = next()) != null) {
            if (f.length == 1 && f[0].isEmpty()) {
                continue;
            }
            if (!f[0].equals("trace") || f.length != 2) {
                throw new BadTrace(lineNo, "expected \"trace SEED\"");
            }
            out.println("trace " + f[1]);
            replay();
            out.println("end");
        }
    }

    private static char letter(CircuitBreaker.State s) {
        return switch (s) {
            case CLOSED -> 'C';
            case OPEN -> 'O';
            case HALF_OPEN -> 'H';
            default -> '?';
        };
    }

    /**
     * Fires the half-open timer, at its instant, if it is due at T; then sets
     * the clock to T. Only before events that reach the breaker (a request, a
     * current call's outcome): the state at other events is not observed,
     * and our filter, which has no timers, makes the same change lazily.
     */
    private static void fireHalfOpenTimer(
        CircuitBreaker cb, TraceClock clock, long since, long maxWaitNanos, long t) {
        if (cb.getState() == CircuitBreaker.State.HALF_OPEN && t - since >= maxWaitNanos) {
            clock.nanos = since + maxWaitNanos;
            cb.transitionToOpenState();
        }
        clock.nanos = t;
    }

    private void replay() throws IOException, BadTrace {
        String[] c = next();
        if (c == null || !c[0].equals("config") || c.length != 10) {
            throw new BadTrace(lineNo, "expected \"config\" with 9 values");
        }
        SlidingWindowType type = switch (c[1]) {
            case "count" -> SlidingWindowType.COUNT_BASED;
            case "time" -> SlidingWindowType.TIME_BASED;
            default -> throw new BadTrace(lineNo, "window must be count or time, got " + c[1]);
        };
        int size = small(c, 2);
        int minimum = small(c, 3);
        int failureRate = small(c, 4);
        long slowMs = num(c, 5);
        int slowRate = small(c, 6);
        long openForMs = num(c, 7);
        int halfOpenCalls = small(c, 8);
        long maxWaitNanos = num(c, 9) * 1_000_000L;

        TraceClock clock = new TraceClock();
        CircuitBreakerConfig.Builder b;
        try {
            b = CircuitBreakerConfig.custom()
                .slidingWindow(size, minimum, type)
                .failureRateThreshold(failureRate)
                .waitDurationInOpenState(Duration.ofMillis(openForMs))
                .permittedNumberOfCallsInHalfOpenState(halfOpenCalls)
                // Fired by the harness (see above), not by Resilience4j's scheduler.
                .maxWaitDurationInHalfOpenState(Duration.ZERO)
                .ignoreExceptions(Ignored.class)
                .clock(clock);
            if (slowMs > 0) {
                b.slowCallDurationThreshold(Duration.ofMillis(slowMs)).slowCallRateThreshold(slowRate);
            } else {
                // No slow-call rule: no call of a trace is this slow.
                b.slowCallDurationThreshold(Duration.ofDays(36500)).slowCallRateThreshold(100);
            }
        } catch (IllegalArgumentException e) {
            throw new BadTrace(lineNo, "Resilience4j refused the config: " + e.getMessage());
        }
        CircuitBreakerConfig config = b.build();

        String[] first = next();
        if (first == null) {
            throw new BadTrace(lineNo, "trace without end");
        }
        // The breaker is created at the trace's first instant (its time window starts there).
        clock.nanos = first[0].equals("end") ? 0 : num(first, 1);
        CircuitBreaker cb = CircuitBreaker.of("oracle", config);
        long[] episode = {0};
        long[] halfOpenSince = {0};
        cb.getEventPublisher().onStateTransition(e -> {
            episode[0]++;
            if (e.getStateTransition().getToState() == CircuitBreaker.State.HALF_OPEN) {
                halfOpenSince[0] = clock.nanos;
            }
        });
        Map<Long, Long> admittedIn = new HashMap<>();
        long last = clock.nanos;

        for (String[] e = first; ; e = next()) {
            if (e == null) {
                throw new BadTrace(lineNo, "trace without end");
            }
            if (e[0].equals("end")) {
                return;
            }
            long t = num(e, 1);
            if (t < last) {
                throw new BadTrace(lineNo, "time went backwards");
            }
            last = t;
            long id = num(e, 2);
            switch (e[0]) {
                case "a" -> {
                    fireHalfOpenTimer(cb, clock, halfOpenSince[0], maxWaitNanos, t);
                    boolean permitted = cb.tryAcquirePermission();
                    if (permitted) {
                        admittedIn.put(id, episode[0]);
                    }
                    out.println("a " + (permitted ? '1' : '0') + ' ' + letter(cb.getState()));
                }
                case "f" -> {
                    if (e.length != 5) {
                        throw new BadTrace(lineNo, "expected \"f T ID KIND DURATION\"");
                    }
                    long duration = num(e, 4);
                    if (!e[3].equals("s") && !e[3].equals("f") && !e[3].equals("i")) {
                        throw new BadTrace(lineNo, "kind must be s, f or i, got " + e[3]);
                    }
                    Long admitted = admittedIn.remove(id);
                    if (admitted != null && admitted == episode[0]) {
                        fireHalfOpenTimer(cb, clock, halfOpenSince[0], maxWaitNanos, t);
                    }
                    if (admitted != null && admitted == episode[0]) {
                        switch (e[3]) {
                            case "s" -> cb.onSuccess(duration, TimeUnit.NANOSECONDS);
                            case "f" -> cb.onError(duration, TimeUnit.NANOSECONDS, new Failed());
                            default -> cb.onError(duration, TimeUnit.NANOSECONDS, new Ignored());
                        }
                    }
                    out.println("f " + letter(cb.getState()));
                }
                default -> throw new BadTrace(lineNo, "expected an event (a, f) or end, got " + e[0]);
            }
        }
    }
}
