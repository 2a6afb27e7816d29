package mesh

import (
	"bufio"
	"fmt"
	"os"
	"path/filepath"
	"regexp"
	"sort"
	"strings"
)

// The registry and tag the manifests in istio/ name.
const (
	ManifestRegistry = "registry.example.com/mesh-filters"
	ManifestTag      = "0.1.0"
)

// Filters are the four filters, by the image name they are pushed under.
var Filters = []string{"ratelimit", "circuit-breaker", "lb-hints", "metrics"}

// Formats are the image formats `cargo xtask push` writes, with the tag
// suffix each is pushed under.
var Formats = map[string]string{"artifact": "", "image": "-image", "docker": "-docker"}

// RepoRoot is the repository's root: $MESH_REPO, else two folders up from
// this module (tests/istio).
func RepoRoot() string {
	if dir := os.Getenv("MESH_REPO"); dir != "" {
		return dir
	}
	dir, err := os.Getwd()
	if err != nil {
		panic(err)
	}
	for d := dir; d != filepath.Dir(d); d = filepath.Dir(d) {
		if _, err := os.Stat(filepath.Join(d, "istio", "reviews-routing.yaml")); err == nil {
			return d
		}
	}
	panic("no istio/reviews-routing.yaml above " + dir + "; set MESH_REPO")
}

// Manifests is the YAML of `istio/reviews-routing.yaml` and every file in
// `istio/<form>/` (form "wasmplugins" or "trafficextensions"), as one
// multi-document string, in file name order (without suite.yaml).
func Manifests(form string) (string, error) {
	root := filepath.Join(RepoRoot(), "istio")
	files, err := filepath.Glob(filepath.Join(root, form, "*.yaml"))
	if err != nil {
		return "", err
	}
	if len(files) == 0 {
		return "", fmt.Errorf("no manifests in %s", filepath.Join(root, form))
	}
	// suite.yaml runs the four policies in one plugin: it replaces the other
	// manifests, and applied with them each policy would run twice.
	kept := files[:0]
	for _, f := range files {
		if filepath.Base(f) != "suite.yaml" {
			kept = append(kept, f)
		}
	}
	files = kept
	sort.Strings(files)
	return documents(append([]string{filepath.Join(root, "reviews-routing.yaml")}, files...))
}

// GlobalManifests is the YAML of `istio/reviews-routing.yaml` and of
// `istio/global-ratelimit/`: the rate limit service and the global rule's
// plugin in one form (`wasmplugin.yaml` or `trafficextension.yaml`).
func GlobalManifests(form string) (string, error) {
	root := filepath.Join(RepoRoot(), "istio")
	var files []string
	for _, f := range []string{"reviews-routing.yaml", "global-ratelimit/ratelimit-service.yaml", "global-ratelimit/" + form + ".yaml"} {
		files = append(files, filepath.Join(root, f))
	}
	return documents(files)
}

// documents is the files, in this order, as one multi-document YAML string.
func documents(files []string) (string, error) {
	var b strings.Builder
	for _, f := range files {
		data, err := os.ReadFile(f)
		if err != nil {
			return "", err
		}
		b.WriteString("---\n")
		b.Write(data)
		b.WriteString("\n")
	}
	return b.String(), nil
}

// Pin says how a manifest names its image.
type Pin int

const (
	// ByTag: `url: oci://<registry>/<filter>:<tag>`.
	ByTag Pin = iota
	// BySha256Field: the tag, and `sha256: <manifest digest>` next to it.
	BySha256Field
	// ByDigestURL: `url: oci://<registry>/<filter>@sha256:<manifest digest>`.
	ByDigestURL
)

func (p Pin) String() string {
	return [...]string{"by tag", "by the sha256 field", "by digest in the url"}[p]
}

var urlLine = regexp.MustCompile(`(?m)^(\s*)url: oci://` + regexp.QuoteMeta(ManifestRegistry) +
	`/([a-z-]+):` + regexp.QuoteMeta(ManifestTag) + `$`)

// PointAt rewrites the manifests' image URLs to `registry` (host:port/path),
// in `format`, pinned as `pin` says with the digests of `pushed`.
func PointAt(yaml, registry, format string, pin Pin, pushed Pushed) (string, error) {
	var missing []string
	out := urlLine.ReplaceAllStringFunc(yaml, func(line string) string {
		m := urlLine.FindStringSubmatch(line)
		indent, filter := m[1], m[2]
		digest := pushed[format][filter]
		if digest == "" && pin != ByTag {
			missing = append(missing, format+" "+filter)
		}
		repo := "oci://" + registry + "/" + filter
		tag := ":" + ManifestTag + Formats[format]
		switch pin {
		case BySha256Field:
			return indent + "url: " + repo + tag + "\n" + indent + "sha256: " + digest
		case ByDigestURL:
			return indent + "url: " + repo + "@sha256:" + digest
		default:
			return indent + "url: " + repo + tag
		}
	})
	if len(missing) > 0 {
		return "", fmt.Errorf("no pushed digest for %v", missing)
	}
	if n := len(urlLine.FindAllString(yaml, -1)); n == 0 {
		return "", fmt.Errorf("no `url: oci://%s/<filter>:%s` line in the manifests", ManifestRegistry, ManifestTag)
	}
	return out, nil
}

// Pushed maps format -> filter -> manifest digest (hex), as `cargo xtask
// push` printed them.
type Pushed map[string]map[string]string

// ReadPushed reads the `pushed <format> <filter> <ref>@sha256:<hex>` lines.
func ReadPushed(path string) (Pushed, error) {
	f, err := os.Open(path)
	if err != nil {
		return nil, err
	}
	defer f.Close()
	pushed := Pushed{}
	scanner := bufio.NewScanner(f)
	for scanner.Scan() {
		words := strings.Fields(scanner.Text())
		if len(words) != 4 || words[0] != "pushed" {
			continue
		}
		_, digest, ok := strings.Cut(words[3], "@sha256:")
		if !ok {
			return nil, fmt.Errorf("%s: no digest in %q", path, scanner.Text())
		}
		if pushed[words[1]] == nil {
			pushed[words[1]] = map[string]string{}
		}
		pushed[words[1]][words[2]] = digest
	}
	return pushed, scanner.Err()
}
