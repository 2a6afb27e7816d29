package mesh

import (
	"fmt"
	"os"
)

// CommandFailer lets a command use Istio's test servers (they want a
// test.Failer): a failure prints the message, runs the cleanups and exits 1.
type CommandFailer struct {
	cleanups []func()
}

// Close runs the cleanups, last registered first.
func (f *CommandFailer) Close() {
	for i := len(f.cleanups) - 1; i >= 0; i-- {
		f.cleanups[i]()
	}
	f.cleanups = nil
}

func (f *CommandFailer) Fail()        { f.FailNow() }
func (f *CommandFailer) FailNow()     { f.Close(); os.Exit(1) }
func (f *CommandFailer) Helper()      {}
func (f *CommandFailer) Log(a ...any) {}

func (f *CommandFailer) Logf(format string, a ...any) {}

func (f *CommandFailer) Fatal(a ...any) {
	fmt.Fprintln(os.Stderr, a...)
	f.FailNow()
}

func (f *CommandFailer) Fatalf(format string, a ...any) {
	fmt.Fprintf(os.Stderr, format+"\n", a...)
	f.FailNow()
}

func (f *CommandFailer) Skip(a ...any) { f.Fatal(a...) }

func (f *CommandFailer) Cleanup(fn func()) { f.cleanups = append(f.cleanups, fn) }

func (f *CommandFailer) TempDir() string {
	dir, err := os.MkdirTemp("", "istio-fetch-")
	if err != nil {
		f.Fatal(err)
	}
	f.Cleanup(func() { os.RemoveAll(dir) })
	return dir
}
